"""The decoder unshuffle: visible tokens in shuffled order + mask token -> every token in original order (+ positions).

The ops `mae_fast::unshuffle` and `mae_fast::unshuffle_backward` (its autograd formula), their reference and kernels:
    reference  `unshuffle_reference` (cat + gather + add) and `_reference_forward` / `_reference_backward`
    cpp        csrc/unshuffle.cpp (registered by mae_fast/ops/cpp.py)
    triton     kernels/unshuffle.py
A kernel is a pair: `forward(x, mask_token, ids_restore, pos_embed, prefix) -> out` gets mask_token (D,) and pos_embed
(prefix + L, D) already in the output dtype (x is read in its own dtype) and returns out in mask_token's dtype;
`backward(grad_out, ids_restore, grad_x, prefix) -> grad of the mask token (D,) float32` fills grad_x (B, prefix + K,
D), allocated in x's dtype, converting grad_out's values as it stores them.

The output dtype is what plain PyTorch gives for the cat + add it replaces: the promotion of x's, the mask token's and
the positions' dtypes (bf16 tokens under autocast with float32 mask token and positions -> a float32 decoder stream,
as FAIR's MAE gets from torch.cat), unless `out_dtype` says otherwise. Visible tokens and the mask token are
converted to it, then the positions are added in it: one rounding. Gradients come back in each input's own dtype."""
from __future__ import annotations

from typing import Callable

import torch

from mae_fast.ops import implementation
from mae_fast.ops.implementation import UnsupportedInput
from mae_fast.ops.layout import gather_tokens

OP = "unshuffle"


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
    kernel = implementation.choose(OP, x_visible.device, impl, x_visible, mask_token, ids_restore, pos_embed,
                                   out_dtype)
    if kernel == "reference":
        return unshuffle_reference(x_visible, mask_token, ids_restore, pos_embed, prefix, out_dtype)
    return unshuffle_op(x_visible, mask_token, ids_restore, pos_embed, prefix, out_dtype, kernel)


def _reference_forward(x, mask_token, ids_restore, pos_embed, prefix=0):
    return unshuffle_reference(x, mask_token, ids_restore, pos_embed, prefix, mask_token.dtype)


def _reference_backward(grad_out, ids_restore, grad_x, prefix=0):
    K = grad_x.shape[1] - prefix
    grad_x[:, :prefix] = grad_out[:, :prefix]
    shuffled = gather_tokens(grad_out[:, prefix:], torch.argsort(ids_restore, dim=1))  # rows in shuffled order
    grad_x[:, prefix:] = shuffled[:, :K]
    return shuffled[:, K:].float().sum(dim=(0, 1))


KERNELS: dict[str, tuple[Callable, Callable]] = {"reference": (_reference_forward, _reference_backward)}


def register_kernel(name: str, forward: Callable, backward: Callable, check: Callable) -> None:
    """Add (`forward`, `backward`) as kernel `name` of this op; `check(x_visible, mask_token, ids_restore,
    pos_embed, out_dtype)` raises UnsupportedInput for inputs it cannot take."""
    KERNELS[name] = (forward, backward)
    implementation.register(OP, name, check)


@torch.library.custom_op("mae_fast::unshuffle", mutates_args=(), schema=(
    "(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, int prefix=0, ScalarType? out_dtype=None, "
    "str kernel='reference') -> Tensor"))
def unshuffle_op(x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None, kernel="reference"):
    """`out_dtype=None` is the promotion of the inputs' dtypes (`unshuffle_out_dtype`)."""
    D = x.shape[-1]
    out_dtype = unshuffle_out_dtype(x, mask_token, pos_embed, out_dtype)
    pos = None if pos_embed is None else pos_embed.reshape(-1, D).to(out_dtype).contiguous()
    forward, _ = KERNELS[kernel]
    return forward(x, mask_token.reshape(D).to(out_dtype).contiguous(), ids_restore.contiguous(), pos, prefix)


@unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None, kernel="reference"):
    B, _, D = x.shape
    return x.new_empty((B, prefix + ids_restore.shape[1], D),
                       dtype=unshuffle_out_dtype(x, mask_token, pos_embed, out_dtype))


@torch.library.custom_op("mae_fast::unshuffle_backward", mutates_args=(), schema=(
    "(Tensor grad_out, Tensor ids_restore, SymInt num_visible, int prefix=0, ScalarType? x_dtype=None, "
    "str kernel='reference') -> (Tensor, Tensor)"))
def unshuffle_backward_op(grad_out, ids_restore, num_visible, prefix=0, x_dtype=None, kernel="reference"):
    """(grad_x in x_dtype, the mask token's float32 gradient)."""
    B, _, D = grad_out.shape
    dtype = grad_out.dtype if x_dtype is None else x_dtype
    grad_x = torch.empty((B, prefix + num_visible, D), dtype=dtype, device=grad_out.device)
    _, backward = KERNELS[kernel]
    grad_mask = backward(grad_out.contiguous(), ids_restore.contiguous(), grad_x, prefix)
    return grad_x, grad_mask


@unshuffle_backward_op.register_fake
def _(grad_out, ids_restore, num_visible, prefix=0, x_dtype=None, kernel="reference"):
    B, _, D = grad_out.shape
    dtype = grad_out.dtype if x_dtype is None else x_dtype
    return (grad_out.new_empty((B, prefix + num_visible, D), dtype=dtype),
            grad_out.new_empty((D,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed, prefix, _, kernel = inputs
    ctx.save_for_backward(ids_restore)
    ctx.x_meta = (x.shape[1] - prefix, x.dtype, prefix, kernel)
    ctx.mask_meta = (mask_token.shape, mask_token.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad_out):
    """grad_x in x's dtype, the mask token's gradient converted from float32 to its own dtype once (not through
    x's or the output's dtype), pos's summed over images in the output dtype."""
    (ids_restore,) = ctx.saved_tensors
    K, x_dtype, prefix, kernel = ctx.x_meta
    grad_out = grad_out.contiguous()
    grad_x, grad_mask = unshuffle_backward_op(grad_out, ids_restore, K, prefix, x_dtype, kernel)
    grad_mask = grad_mask.to(ctx.mask_meta[1]).reshape(ctx.mask_meta[0]) if ctx.needs_input_grad[1] else None
    grad_pos = None
    if ctx.pos_meta is not None and ctx.needs_input_grad[3]:
        grad_pos = grad_out.sum(0).to(ctx.pos_meta[1]).reshape(ctx.pos_meta[0])
    return grad_x, grad_mask, None, grad_pos, None, None, None


unshuffle_op.register_autograd(_backward, setup_context=_setup_context)


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
