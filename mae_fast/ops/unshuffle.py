"""The decoder unshuffle: visible tokens in shuffled order + mask token -> every token in original order (+ positions).

The torch ops `mae_fast::unshuffle` and `mae_fast::unshuffle_backward` (its autograd formula):
    definition   `unshuffle_op`, `unshuffle_backward_op` below (schema, fake, autograd); their default bodies are
                 the reference kernel `_reference_forward` / `_reference_backward`
    reference    `unshuffle_reference` (cat + gather + add): what the public function runs for impl="reference" or
                 MAE_FAST_IMPL=reference
    kernels      `REGISTERED` ({op: {device: kernel name}}, filled by `register_kernel`):
                 cpu   cpp     csrc/unshuffle.cpp (registered by mae_fast/ops/cpp.py)
                 cuda  triton  kernels/unshuffle.py
A kernel is a pair: `forward(x, mask_token, ids_restore, pos_embed, prefix) -> out` gets mask_token (D,) and pos_embed
(prefix + L, D) already in the output dtype (x is read in its own dtype) and returns out in mask_token's dtype;
`backward(grad_out, ids_restore, grad_x, prefix) -> grad of the mask token (D,) float32` fills grad_x (B, prefix + K,
D), allocated in x's dtype, converting grad_out's values as it stores them.

The output dtype is what plain PyTorch gives for the cat + add it replaces: the promotion of x's, the mask token's and
the positions' dtypes (bf16 tokens under autocast with float32 mask token and positions -> a float32 decoder stream,
as FAIR's MAE gets from torch.cat), unless `out_dtype` says otherwise. Visible tokens and the mask token are
converted to it, then the positions are added in it: one rounding. Gradients come back in each input's own dtype."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from mae_fast.ops import implementation
from mae_fast.ops.implementation import UnsupportedInput
from mae_fast.ops.layout import gather_tokens

OP, BACKWARD_OP = "unshuffle", "unshuffle_backward"


def unshuffle_out_dtype(x_visible: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None,
                        out_dtype: torch.dtype | None = None) -> torch.dtype:
    """`out_dtype` if given, else the promotion of the inputs' dtypes (what torch.cat + add would give)."""
    if out_dtype is not None:
        return out_dtype
    dtype = torch.promote_types(x_visible.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def unshuffle_reference(x_visible, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None):
    out_dtype = unshuffle_out_dtype(x_visible, mask_token, pos_embed, out_dtype)
    B, rows, D = x_visible.shape
    L = ids_restore.shape[1]
    K = rows - prefix
    x = x_visible.to(out_dtype)
    tokens = torch.cat([x[:, prefix:], mask_token.reshape(1, 1, D).to(out_dtype).expand(B, L - K, D)], dim=1)
    x = torch.cat([x[:, :prefix], gather_tokens(tokens, ids_restore)], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, prefix + L, D).to(out_dtype)
    return x


def unshuffle(
    x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None, impl: str = "auto", *, prefix: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Tokens (B, prefix + K, D) -- `prefix` leading tokens that keep their place (the class token), then K visible
    tokens in shuffled order -- + mask token (D,) -> (B, prefix + L, D) in original order (+ pos (prefix + L, D)).
    The output's dtype is `out_dtype`, by default the promotion of x's, mask_token's and pos_embed's dtypes."""
    if x_visible.ndim != 3:
        raise ValueError(f"x_visible must be (B, prefix + K, D), got shape {tuple(x_visible.shape)}")
    B, rows, D = x_visible.shape
    if prefix < 0 or prefix > rows:
        raise ValueError(f"prefix must be in [0, {rows}], got {prefix}")
    K = rows - prefix
    if ids_restore.ndim != 2 or ids_restore.shape[0] != B or ids_restore.shape[1] < K:
        raise ValueError(f"ids_restore must be (B={B}, L>={K}), got shape {tuple(ids_restore.shape)}")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must hold D={D} values, got shape {tuple(mask_token.shape)}")
    L = ids_restore.shape[1]
    if pos_embed is not None and pos_embed.numel() != (prefix + L) * D:
        raise ValueError(f"pos_embed must be (prefix + L={prefix + L}, D={D}), got shape {tuple(pos_embed.shape)}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    out_dtype = unshuffle_out_dtype(x_visible, mask_token, pos_embed, out_dtype)
    if implementation.runs_reference(OP, impl):
        return unshuffle_reference(x_visible, mask_token, ids_restore, pos_embed, prefix, out_dtype)
    return implementation.call(OP, impl, x_visible.device, unshuffle_op, x_visible, mask_token, ids_restore,
                               pos_embed, prefix, out_dtype)


def _reference_forward(x, mask_token, ids_restore, pos_embed, prefix=0):
    return unshuffle_reference(x, mask_token, ids_restore, pos_embed, prefix, mask_token.dtype)


def _reference_backward(grad_out, ids_restore, grad_x, prefix=0):
    K = grad_x.shape[1] - prefix
    grad_x[:, :prefix] = grad_out[:, :prefix]
    shuffled = gather_tokens(grad_out[:, prefix:], torch.argsort(ids_restore, dim=1))  # rows in shuffled order
    grad_x[:, prefix:] = shuffled[:, :K]
    return shuffled[:, K:].float().sum(dim=(0, 1))


# kernel name -> (forward, backward) (the signatures above)
KERNELS: dict[str, tuple[Callable, Callable]] = {"reference": (_reference_forward, _reference_backward)}


def _run_forward(forward, x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None):
    """`mae_fast::unshuffle` computed by a forward kernel; `out_dtype=None` is the promotion of the inputs' dtypes
    (`unshuffle_out_dtype`)."""
    D = x.shape[-1]
    out_dtype = unshuffle_out_dtype(x, mask_token, pos_embed, out_dtype)
    pos = None if pos_embed is None else pos_embed.reshape(-1, D).to(out_dtype).contiguous()
    return forward(x, mask_token.reshape(D).to(out_dtype).contiguous(), ids_restore.contiguous(), pos, prefix)


def _run_backward(backward, grad_out, ids_restore, num_visible, prefix=0, x_dtype=None):
    """`mae_fast::unshuffle_backward` computed by a backward kernel: (grad_x in x_dtype, the mask token's float32
    gradient)."""
    B, _, D = grad_out.shape
    dtype = grad_out.dtype if x_dtype is None else x_dtype
    grad_x = torch.empty((B, prefix + num_visible, D), dtype=dtype, device=grad_out.device)
    grad_mask = backward(grad_out.contiguous(), ids_restore.contiguous(), grad_x, prefix)
    return grad_x, grad_mask


def _default_forward(x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None):
    """The op by the reference kernel: its default body."""
    implementation.record(OP, "reference")
    return _run_forward(_reference_forward, x, mask_token, ids_restore, pos_embed, prefix, out_dtype)


def _default_backward(grad_out, ids_restore, num_visible, prefix=0, x_dtype=None):
    """The backward op by the reference kernel: its default body."""
    implementation.record(BACKWARD_OP, "reference")
    return _run_backward(_reference_backward, grad_out, ids_restore, num_visible, prefix, x_dtype)


unshuffle_op = torch.library.custom_op("mae_fast::unshuffle", _default_forward, mutates_args=(), schema=(
    "(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, int prefix=0, ScalarType? out_dtype=None) "
    "-> Tensor"))


@unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None):
    B, _, D = x.shape
    return x.new_empty((B, prefix + ids_restore.shape[1], D),
                       dtype=unshuffle_out_dtype(x, mask_token, pos_embed, out_dtype))


unshuffle_backward_op = torch.library.custom_op("mae_fast::unshuffle_backward", _default_backward, mutates_args=(),
                                                schema=("(Tensor grad_out, Tensor ids_restore, SymInt num_visible, "
                                                        "int prefix=0, ScalarType? x_dtype=None) -> (Tensor, Tensor)"))


@unshuffle_backward_op.register_fake
def _(grad_out, ids_restore, num_visible, prefix=0, x_dtype=None):
    B, _, D = grad_out.shape
    dtype = grad_out.dtype if x_dtype is None else x_dtype
    return (grad_out.new_empty((B, prefix + num_visible, D), dtype=dtype),
            grad_out.new_empty((D,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed, prefix, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.x_meta = (x.shape[1] - prefix, x.dtype, prefix)
    ctx.mask_meta = (mask_token.shape, mask_token.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad_out):
    """grad_x in x's dtype, the mask token's gradient converted from float32 to its own dtype once (not through
    x's or the output's dtype), pos's summed over images in the output dtype."""
    (ids_restore,) = ctx.saved_tensors
    K, x_dtype, prefix = ctx.x_meta
    grad_out = grad_out.contiguous()
    grad_x, grad_mask = unshuffle_backward_op(grad_out, ids_restore, K, prefix, x_dtype)
    grad_mask = grad_mask.to(ctx.mask_meta[1]).reshape(ctx.mask_meta[0]) if ctx.needs_input_grad[1] else None
    grad_pos = None
    if ctx.pos_meta is not None and ctx.needs_input_grad[3]:
        grad_pos = grad_out.sum(0).to(ctx.pos_meta[1]).reshape(ctx.pos_meta[0])
    return grad_x, grad_mask, None, grad_pos, None, None


unshuffle_op.register_autograd(_backward, setup_context=_setup_context)

REGISTERED: dict[str, dict[str, str]] = {  # op -> device -> the kernel registered for its tensors
    OP: implementation.define(OP, unshuffle_op, _default_forward),
    BACKWARD_OP: implementation.define(BACKWARD_OP, unshuffle_backward_op, _default_backward),
}


def register_kernel(name: str, device: str, forward: Callable, backward: Callable, check: Callable,
                    backward_check: Callable) -> None:
    """Register (`forward`, `backward`) as kernel `name` of this op and its backward op for tensors of `device`;
    `check(x_visible, mask_token, ids_restore, pos_embed, out_dtype)` and `backward_check(grad_out, ids_restore,
    x_dtype)` raise UnsupportedInput for inputs they cannot take."""
    KERNELS[name] = (forward, backward)
    implementation.register_device_kernel(
        OP, device, name, functools.partial(_run_forward, forward),
        lambda x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None:
            check(x, mask_token, ids_restore, pos_embed, out_dtype))
    implementation.register_device_kernel(
        BACKWARD_OP, device, name, functools.partial(_run_backward, backward),
        lambda grad_out, ids_restore, num_visible, prefix=0, x_dtype=None: backward_check(grad_out, ids_restore,
                                                                                           x_dtype))


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed, out_dtype=None) -> None:
    if x_visible.dtype not in FUSED_DTYPES:
        raise UnsupportedInput(f"x_visible of dtype {x_visible.dtype}")
    out_dtype = unshuffle_out_dtype(x_visible, mask_token, pos_embed, out_dtype)
    if out_dtype not in FUSED_DTYPES:
        raise UnsupportedInput(f"an output of dtype {out_dtype}")
    if x_visible.stride(-1) != 1:
        raise UnsupportedInput("x_visible without unit stride in the last dimension")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")


def check_fused_unshuffle_backward_input(grad_out, ids_restore, x_dtype=None) -> None:
    """What the fused backward kernels take: gradients and grad_x of the fused dtypes, int64 ids."""
    if grad_out.dtype not in FUSED_DTYPES:
        raise UnsupportedInput(f"grad_out of dtype {grad_out.dtype}")
    if x_dtype is not None and x_dtype not in FUSED_DTYPES:
        raise UnsupportedInput(f"a grad_x of dtype {x_dtype}")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")
