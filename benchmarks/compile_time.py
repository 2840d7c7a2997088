"""Cold compile time of a regionally compiled training step on the CPU (Dynamo + the aot_eager backend: tracing
and AOT autograd, no code generation), at ViT-L/8's widths (1024-d, 24 encoder + 8 decoder blocks). The crop is
small (--img-size, default 64) so that the step's arithmetic stays small beside the compilation; the graphs are
the same at any crop size. Cold compile = first step (compile + run) - the median of the next steps.

    python benchmarks/compile_time.py [--preset mae_vit_large_patch8_256] [--img-size 64] [--out FILE.json]

Run it on two checkouts to compare (PYTHONPATH=OTHER_CHECKOUT python benchmarks/compile_time.py ...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if os.environ.get("PYTHONPATH") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mae_vit_large_patch8_256")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steady steps after the first")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()

    from torch._dynamo.utils import counters

    import mae_fast
    from mae_fast.compiling import compile_blocks
    from mae_fast.models import create_model

    torch.manual_seed(0)
    model = create_model(args.preset, img_size=args.img_size)
    blocks = compile_blocks(model, args.backend)
    images = torch.randint(0, 255, (args.batch, model.cfg.in_chans, args.img_size, args.img_size), dtype=torch.uint8)
    times = []
    for _ in range(1 + args.steps):
        t = time.perf_counter()
        model(images).loss.backward()
        times.append(time.perf_counter() - t)
    steady = statistics.median(times[1:])
    report = {"preset": args.preset, "img_size": args.img_size, "batch": args.batch, "backend": args.backend,
              "compiled_blocks": blocks, "graphs": int(counters["stats"]["unique_graphs"]),
              "first_step_s": round(times[0], 2), "steady_step_s": round(steady, 3),
              "cold_compile_s": round(times[0] - steady, 2), "code": os.path.dirname(mae_fast.__file__),
              "torch": torch.__version__, "load_average": os.getloadavg()}
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
