"""The MAE loss: (1 - alpha) * masked MSE + alpha * Fourier loss (the reference, the torch-op factory of the fused
backends with their autograd formula, and their input checks)."""
from __future__ import annotations

from typing import Callable

import torch

from mae_fast.ops.dispatch import TORCH_OPS, UnsupportedInput, dispatch, register
from mae_fast.ops.layout import LAYOUTS, Masking, compute_dtype, gather_tokens


def patch_planes(tokens: torch.Tensor, patch_size: int, layout: str) -> torch.Tensor:
    """Tokens (B, N, P) -> per-token per-channel pixel planes (B, N, C', p, p) (C' = 1 for the channel layout)."""
    B, N, P = tokens.shape
    p = patch_size
    if layout == "standard":
        C = P // (p * p)
        return tokens.reshape(B, N, p, p, C).permute(0, 1, 4, 2, 3)
    if layout == "channel":
        return tokens.reshape(B, N, 1, p, p)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def fourier_magnitude(tokens: torch.Tensor, patch_size: int, layout: str) -> torch.Tensor:
    """|FFT2| of every p x p plane of every token: (B, N, C', p, p)."""
    planes = patch_planes(tokens, patch_size, layout)
    return torch.fft.fft2(planes.to(compute_dtype(tokens))).abs()


@register("mae_loss", "reference")
def _mae_loss_reference(pred, target, mask, patch_size, layout, alpha):
    dtype = compute_dtype(pred)
    mse = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)  # (B, N)
    fourier = (fourier_magnitude(pred, patch_size, layout) - fourier_magnitude(target, patch_size, layout)).abs()
    fourier = fourier.flatten(2).mean(dim=-1)  # (B, N): mean over channels and frequencies
    per_token = (1 - alpha) * mse + alpha * fourier
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def token_weights(mask: torch.Tensor | None, batch: int, tokens: int) -> tuple[torch.Tensor | None, float]:
    """The fused losses weight token n by mask[n] / max(sum(mask), 1), or uniformly by 1 / (B*N) without a mask:
    (per-token float32 weights (B*N,) or None, the uniform weight)."""
    if mask is None:
        return None, 1.0 / (batch * tokens)
    if mask.shape != (batch, tokens):
        raise ValueError(f"mask must be (B={batch}, N={tokens}), got shape {tuple(mask.shape)}")
    mask = mask.float()
    return (mask / mask.sum().clamp_min(1)).reshape(-1).contiguous(), 0.0


def define_mae_loss_op(backend: str, kernel: Callable) -> Callable:
    """The torch op `mae_fast::mae_loss_{backend}(pred, target, mask, patch_size, alpha) -> (loss, grad)`, with a fake
    implementation and an autograd formula, so that torch.compile keeps it as one opaque node.

    `kernel(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad) -> loss` writes
    d loss / d pred into `grad` in the same pass. The op returns that buffer as a second, non-differentiable output;
    backward only scales it by the incoming gradient (out of place, so retain_graph works; higher-order gradients
    are refused: use impl="reference")."""
    name = f"mae_fast::mae_loss_{backend}"
    if name in TORCH_OPS:
        return TORCH_OPS[name]

    @torch.library.custom_op(name, mutates_args=(), schema=(
        "(Tensor pred, Tensor target, Tensor? mask, int patch_size, float alpha) -> (Tensor, Tensor)"))
    def mae_loss_op(pred, target, mask, patch_size, alpha):
        B, N, P = pred.shape
        weight, uniform = token_weights(mask, B, N)
        pred, target = pred.contiguous(), target.contiguous()
        grad = torch.empty_like(pred)
        loss = kernel(pred, target, weight, uniform, patch_size, P // (patch_size * patch_size), alpha, grad)
        return loss, grad

    @mae_loss_op.register_fake
    def _(pred, target, mask, patch_size, alpha):
        return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape)

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad)

    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None

    mae_loss_op.register_autograd(backward, setup_context=setup_context)
    TORCH_OPS[name] = mae_loss_op
    return mae_loss_op


def fused_mae_loss(op: Callable, pred, target, mask, patch_size: int, alpha: float) -> torch.Tensor:
    """The loss of an op made by `define_mae_loss_op` (its gradient buffer stays with autograd)."""
    loss, _ = op(pred, target, mask, patch_size, alpha)
    return loss


def check_fused_loss_input(pred, target, mask, patch_size, layout, alpha, patch_sizes=None) -> None:
    """What the fused losses take: float32/bfloat16/float16 tensors, no gradient into target, a float mask."""
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UnsupportedInput(f"{name} of dtype {t.dtype}")
    if target.requires_grad and torch.is_grad_enabled():
        raise UnsupportedInput("a target that requires grad")
    if patch_sizes is not None and patch_size not in patch_sizes:
        raise UnsupportedInput(f"patch size {patch_size} (kernels for {patch_sizes})")
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        raise UnsupportedInput("a mask that requires grad")


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
    patch_size: int, layout: str = "standard", alpha: float = 0.01, impl: str = "auto",
) -> torch.Tensor:
    """Per-token reconstruction loss averaged over the tokens where `mask` is 1 (all tokens if mask is None).

    pred, target: (B, N, P) in `layout`. Per token: (1-alpha) * mean squared error over its pixels
    + alpha * mean over channels and frequencies of | |FFT2(pred plane)| - |FFT2(target plane)| |.
    The fused backends compute the loss and its gradient with respect to `pred` in one pass; gradients with
    respect to `target` (which is data) are only available from the reference.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim != 3:
        raise ValueError(f"pred and target must be (B, N, P), got shape {tuple(pred.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    P = pred.shape[-1]
    if P % (patch_size * patch_size):
        raise ValueError(f"token size {P} is not a multiple of patch_size^2 = {patch_size**2}")
    if layout == "channel" and P != patch_size * patch_size:
        raise ValueError(f"channel-layout tokens hold p*p = {patch_size**2} values, got {P}")
    if pred.shape[0] * pred.shape[1] == 0:
        return no_tokens_loss(pred)
    return dispatch("mae_loss", pred.device, impl, pred, target, mask, patch_size, layout, float(alpha))


def no_tokens_loss(pred: torch.Tensor) -> torch.Tensor:
    """The loss over no tokens (mask ratio 0: nothing masked): 0, with a zero gradient for `pred`."""
    return pred.float().sum() * 0.0 + 0.0  # + 0.0: not -0.0


@register("masked_mae_loss", "reference")
def _masked_mae_loss_reference(pred, target, masking, patch_size, layout, alpha):
    return _mae_loss_reference(gather_tokens(pred, masking.ids_masked), target, None, patch_size, layout, alpha)


def masked_mae_loss(
    pred: torch.Tensor, target: torch.Tensor, masking: Masking, *,
    patch_size: int, layout: str = "standard", alpha: float = 0.01, impl: str = "auto",
) -> torch.Tensor:
    """The loss of the decoder's full prediction on the masked tokens: `mae_loss(gather_tokens(pred,
    masking.ids_masked), target, ...)`, with its gradient. pred: (B, L, P); target: (B, L - len_keep, P) in
    `masking.ids_masked` order. The Triton backend reads the masked rows of pred in place and writes the (B, L, P)
    gradient (zeros at visible tokens, scaled by the incoming gradient) in one pass, where the composed form
    gathers, scales and scatters."""
    if pred.ndim != 3 or target.ndim != 3:
        raise ValueError(f"pred and target must be (B, L, P) and (B, L - len_keep, P), got shapes "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    B, L, P = pred.shape
    if masking.ids_restore.shape != (B, L):
        raise ValueError(f"masking covers {tuple(masking.ids_restore.shape)} tokens, pred has {(B, L)}")
    if target.shape != (B, L - masking.len_keep, P):
        raise ValueError(f"target must be (B, L - len_keep, P) = {(B, L - masking.len_keep, P)}, got "
                         f"{tuple(target.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if P % (patch_size * patch_size):
        raise ValueError(f"token size {P} is not a multiple of patch_size^2 = {patch_size**2}")
    if masking.len_keep == L or B == 0:  # mask ratio 0: no masked token to score
        return no_tokens_loss(pred)
    return dispatch("masked_mae_loss", pred.device, impl, pred, target, masking, patch_size, layout, float(alpha))
