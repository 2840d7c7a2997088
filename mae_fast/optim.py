"""Lion optimiser (Chen et al. 2023) with decoupled weight decay, and the one-cycle cosine schedule.

Update per parameter (docs/DESIGN.md §2):
    p <- p * (1 - lr * wd)
    p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
    m <- beta2 * m + (1 - beta2) * g
The arithmetic lives in `mae_fast.ops.lion_update` (reference, foreach, and the fused kernels behind it).
"""
from __future__ import annotations

import math
import operator

import torch

from mae_fast import ops

try:  # FSDP2 parameters; absent from torch builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # isinstance(x, ()) is False


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates land in the DTensor), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class Lion(torch.optim.Optimizer):
    """Lion. `impl`: "auto" (fused kernel where available), "reference" (one tensor at a time), "foreach".
    `momentum_dtype`: dtype of the exp_avg state (default: the parameter's dtype, float32 for fp32 master weights).
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.95), weight_decay: float = 0.0,
                 impl: str = "auto", momentum_dtype: torch.dtype | None = None):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if impl not in ops.LION_IMPLS:
            raise ValueError(f"impl must be one of {ops.LION_IMPLS}, got {impl!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.impl = impl
        self.momentum_dtype = momentum_dtype
        # group index -> its buckets (see _buckets); made here, not lazily in step(), which torch.compile traces
        # (Dynamo of torch 2.11 refuses a new attribute set on the optimiser inside the compiled step)
        self._bucket_cache: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for ps, gs, ms in self._buckets(index, group):
                ops.lion_update(ps, gs, ms, lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], impl=self.impl)
        return loss

    def _buckets(self, index: int, group: dict) -> list[tuple[list, list, list]]:
        """(params, grads, exp_avgs) per device of the group's parameters that have a gradient. The split (and the
        state) is made once and reused while the same parameters have gradients: a step then costs one pass over
        `p.grad` (the fused kernels keep their own tables, see mae_fast.kernels.lion.LionPlan)."""
        params = group["params"]
        grads = [p.grad for p in params]
        has_grad = tuple(g is not None for g in grads)
        cache = self._bucket_cache
        cached = cache.get(index)
        if cached is None or cached[0] != has_grad or len(cached[1]) != len(params) or not all(
                map(operator.is_, cached[1], params)):
            buckets: dict[torch.device, tuple[list[int], list, list]] = {}
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype,
                                                        memory_format=torch.preserve_format)
                # FSDP2 shards are DTensors: Lion is elementwise, so each rank updates its local shard in place
                p_, m_ = _local(p), _local(state["exp_avg"])
                if p_.numel() == 0:  # a rank's empty shard of a small parameter
                    continue
                idx, ps, ms = buckets.setdefault(p_.device, ([], [], []))
                idx.append(i)
                ps.append(p_)
                ms.append(m_)
            cached = cache[index] = (has_grad, list(params), list(buckets.values()))
        grads = [_local(g) for g in grads]
        whole = len(cached[2]) == 1 and len(cached[2][0][0]) == len(params)
        return [(ps, grads if whole else [grads[i] for i in idx], ms) for idx, ps, ms in cached[2]]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._bucket_cache = {}  # exp_avg tensors were replaced


def one_cycle_cosine(step: int, total_steps: int, max_lr: float, warmup_fraction: float = 0.1,
                     start_div: float = 25.0, final_div: float = 1e4) -> float:
    """One-cycle schedule (as torch's OneCycleLR with cosine annealing): cosine rise from max_lr/start_div to
    max_lr over the first `warmup_fraction` of steps, then cosine decay to max_lr/(start_div*final_div)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warm = max(1, int(round(warmup_fraction * total_steps)))
    lo_start, lo_end = max_lr / start_div, max_lr / (start_div * final_div)
    step = min(max(step, 0), total_steps)
    if step < warm:
        t = step / warm
        return lo_start + (max_lr - lo_start) * (1 - math.cos(math.pi * t)) / 2
    t = (step - warm) / max(1, total_steps - warm)
    return lo_end + (max_lr - lo_end) * (1 + math.cos(math.pi * t)) / 2


def lion_param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, LayerScale gammas and tokens (1-D parameters), as in FAIR's MAE."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or p.shape[:2] == (1, 1) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
