"""Host time of one fused Lion step without its kernel launches: the optimiser's bucket lookup, the plan check
(`LionPlan.matches`) and the hyperparameter copy, over the 420 parameter tensors of mae_vit_large_patch8_256
(shapes as the model, 1 element each: host work depends on the number of tensors, not their size).

    TRITON_INTERPRET=1 python benchmarks/lion_host_overhead.py [--steps 200]

zero_grad both ways: set_to_none=False keeps the gradient tensors; set_to_none=True frees them and the next
backward allocates new ones (here: torch.empty_like per tensor, as autograd does). On a GPU the caching allocator
usually hands the freed blocks back (plan reused as is); otherwise only the tables' gradient rows are rewritten.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors through the Triton backend, no GPU needed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mae_fast import models, ops  # noqa: E402
from mae_fast.ops.triton import kernels_module  # noqa: E402
from mae_fast.optim import Lion  # noqa: E402

kernels_module(os.path.join(ROOT, "kernels"))
from mae_fast.kernels import lion  # noqa: E402
from mae_fast.ops.lion import LionScalars  # noqa: E402


def measure(set_to_none: bool, steps: int, name: str = "mae_vit_large_patch8_256") -> dict:
    with torch.device("meta"):
        shapes = [p.shape for p in models.create_model(name).parameters()]
    params = [torch.nn.Parameter(torch.randn(1)) for _ in shapes]
    opt = Lion(params, lr=1e-4, weight_decay=0.05, impl="triton")
    s = LionScalars.make(1e-4, 0.9, 0.95, 0.05)
    for p in params:
        p.grad = torch.randn(1)
    times, builds, plan = [], lion.plans.builds, None
    for i in range(steps + 5):
        if set_to_none:
            opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = torch.empty_like(p)
        t0 = time.perf_counter()
        for index, group in enumerate(opt.param_groups):
            for ps, gs, ms in opt._buckets(index, group):
                plan = lion.plans.get(ps, gs, ms)
                plan.write_scalars(s if i % 2 else LionScalars.make(2e-4, 0.9, 0.95, 0.05))  # lr changes
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return {"set_to_none": set_to_none, "tensors": len(params), "median_us": statistics.median(times) * 1e6,
            "rebuilds": lion.plans.builds - builds - 1, "grad_row_rewrites": plan.grad_moves, "steps": steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    for set_to_none in (False, True):
        r = measure(set_to_none, args.steps)
        print(f"set_to_none={r['set_to_none']!s:<5} {r['tensors']} tensors: host {r['median_us']:7.1f} us per step "
              f"(median of {r['steps']}), plan rebuilds after the first: {r['rebuilds']}, gradient-row rewrites: "
              f"{r['grad_row_rewrites']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
