"""The decoder unshuffle: visible tokens in shuffled order + the mask token -> every token in original order (+ positions)
(the reference, the torch-op factory of the fused backends with their autograd formula, and their input checks)."""
from __future__ import annotations

from typing import Callable

import torch

from mae_fast.ops.dispatch import TORCH_OPS, UnsupportedInput, dispatch, register
from mae_fast.ops.layout import gather_tokens

@register("unshuffle", "reference")
def _unshuffle_reference(x_visible, mask_token, ids_restore, pos_embed, prefix=0):
    B, rows, D = x_visible.shape
    L = ids_restore.shape[1]
    K = rows - prefix
    x = torch.cat([x_visible[:, prefix:], mask_token.reshape(1, 1, D).expand(B, L - K, D).to(x_visible.dtype)],
                  dim=1)
    x = torch.cat([x_visible[:, :prefix], gather_tokens(x, ids_restore)], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, prefix + L, D).to(x.dtype)
    return x


def unshuffle(
    x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None, impl: str = "auto", *, prefix: int = 0,
) -> torch.Tensor:
    """Tokens (B, prefix + K, D) -- `prefix` leading tokens that keep their place (the class token), then K visible
    tokens in shuffled order -- + mask token (D,) -> (B, prefix + L, D) in original order (+ pos (prefix + L, D))."""
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
    return dispatch("unshuffle", x_visible.device, impl, x_visible, mask_token, ids_restore, pos_embed, prefix)


def define_unshuffle_op(backend: str, forward_kernel: Callable, backward_kernel: Callable) -> Callable:
    """The torch op `mae_fast::unshuffle_{backend}(x, mask_token, ids_restore, pos_embed, prefix=0) -> out` (and its
    backward op), with a fake implementation and an autograd formula, so that torch.compile keeps it as one opaque
    node.

    `forward_kernel(x, mask_token, ids_restore, pos_embed, prefix) -> out` gets mask_token (D,) and pos_embed
    (prefix + L, D) already in x's dtype (so both paths round as the reference); `backward_kernel(grad_out,
    ids_restore, grad_x, prefix) -> grad of the mask token (D,) float32` fills grad_x (B, prefix + K, D). The mask
    token's gradient is converted from float32 to its own dtype once (not through x's dtype)."""
    name = f"mae_fast::unshuffle_{backend}"
    if name in TORCH_OPS:
        return TORCH_OPS[name]

    @torch.library.custom_op(name, mutates_args=(), schema=(
        "(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, int prefix=0) -> Tensor"))
    def unshuffle_op(x, mask_token, ids_restore, pos_embed, prefix=0):
        D = x.shape[-1]
        pos = None if pos_embed is None else pos_embed.reshape(-1, D).to(x.dtype).contiguous()
        return forward_kernel(x, mask_token.reshape(D).to(x.dtype).contiguous(), ids_restore, pos, prefix)

    @unshuffle_op.register_fake
    def _(x, mask_token, ids_restore, pos_embed, prefix=0):
        B, _, D = x.shape
        return x.new_empty((B, prefix + ids_restore.shape[1], D))

    @torch.library.custom_op(f"{name}_backward", mutates_args=(), schema=(
        "(Tensor grad_out, Tensor ids_restore, SymInt num_visible, int prefix=0) -> (Tensor, Tensor)"))
    def unshuffle_backward_op(grad_out, ids_restore, num_visible, prefix=0):
        B, _, D = grad_out.shape
        grad_x = torch.empty((B, prefix + num_visible, D), dtype=grad_out.dtype, device=grad_out.device)
        grad_mask = backward_kernel(grad_out.contiguous(), ids_restore, grad_x, prefix)
        return grad_x, grad_mask

    @unshuffle_backward_op.register_fake
    def _(grad_out, ids_restore, num_visible, prefix=0):
        B, _, D = grad_out.shape
        return (grad_out.new_empty((B, prefix + num_visible, D)),
                grad_out.new_empty((D,), dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed, prefix = inputs
        ctx.save_for_backward(ids_restore)
        ctx.x_meta = (x.shape[1] - prefix, x.dtype, prefix)
        ctx.mask_meta = (mask_token.shape, mask_token.dtype)
        ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)

    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        K, dtype, prefix = ctx.x_meta
        grad_out = grad_out.contiguous()
        grad_x, grad_mask = unshuffle_backward_op(grad_out, ids_restore, K, prefix)
        grad_mask = grad_mask.to(ctx.mask_meta[1]).reshape(ctx.mask_meta[0]) if ctx.needs_input_grad[1] else None
        grad_pos = None
        if ctx.pos_meta is not None and ctx.needs_input_grad[3]:
            grad_pos = grad_out.sum(0).to(ctx.pos_meta[1]).reshape(ctx.pos_meta[0])
        return grad_x.to(dtype), grad_mask, None, grad_pos, None

    unshuffle_op.register_autograd(backward, setup_context=setup_context)
    TORCH_OPS[name] = unshuffle_op
    return unshuffle_op


def check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed) -> None:
    if x_visible.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedInput(f"x_visible of dtype {x_visible.dtype}")
    if x_visible.stride(-1) != 1:
        raise UnsupportedInput("x_visible without unit stride in the last dimension")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")
