"""The MAE loss: (1 - alpha) * masked MSE + alpha * Fourier loss.

The torch ops `mae_fast::mae_loss` (on the masked tokens) and `mae_fast::masked_mae_loss` (on the decoder's full
prediction) with its backward `mae_fast::masked_mae_loss_backward`:
    definition   `mae_loss_op`, `masked_mae_loss_op`, `masked_mae_loss_backward_op` below (schema, fake, autograd);
                 their default bodies are the reference kernel `_reference_kernel` / `_reference_scatter`
    reference    `mae_loss_reference` / `masked_mae_loss_reference` (autograd gives the gradient): what the public
                 functions run for impl="reference" or MAE_FAST_IMPL=reference
    kernels      `REGISTERED` ({op: {device: kernel name}}, filled by `register_kernel`):
                 cpu   cpp     csrc/mae_loss.cpp (mae_fast/ops/cpp.py; masked_mae_loss gathers the rows first,
                               its backward is the default body)
                 cuda  triton  kernels/mae_loss.py (reads the masked rows in place; + its scatter for the backward)
A loss kernel is `kernel(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad,
row_ids) -> loss` (float32 scalar) that writes d loss / d pred into `grad` in the same pass; the op returns that
buffer as a second, non-differentiable output and backward only scales it by the incoming gradient (out of place,
so retain_graph works; higher-order gradients are refused: use impl="reference"). `row_ids` (B, M) (only for a
kernel registered with `row_map=True`): pred is the full prediction (B, L, P) and token (b, m) of target and grad
is pred[b, row_ids[b, m]]; other kernels get the masked rows gathered first.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from mae_fast.ops import implementation
from mae_fast.ops.implementation import UnsupportedInput
from mae_fast.ops.layout import LAYOUTS, Masking, compute_dtype, gather_tokens

OP, MASKED_OP, SCATTER_OP = "mae_loss", "masked_mae_loss", "masked_mae_loss_backward"


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


def per_token_loss(pred, target, patch_size, layout, alpha) -> torch.Tensor:
    """(B, N): (1 - alpha) * MSE + alpha * Fourier loss of every token."""
    dtype = compute_dtype(pred)
    mse = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)  # (B, N)
    fourier = (fourier_magnitude(pred, patch_size, layout) - fourier_magnitude(target, patch_size, layout)).abs()
    fourier = fourier.flatten(2).mean(dim=-1)  # (B, N): mean over channels and frequencies
    return (1 - alpha) * mse + alpha * fourier


def mae_loss_reference(pred, target, mask, patch_size, layout, alpha):
    per_token = per_token_loss(pred, target, patch_size, layout, alpha)
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


def _reference_kernel(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad,
                      row_ids=None):
    """The kernel form of the reference: the weighted tokens' loss and its gradient in closed form (a custom op's
    body runs below autograd). Per plane, d sum_f |F x|_f / dx = Re(W^H S) = p^2 Re(ifft2(S)) with
    S = sign(|Fx| - |Fy|) Fx / |Fx| (0 where |Fx| = 0, as torch's abs)."""
    if row_ids is not None:
        pred = gather_tokens(pred, row_ids)
    p = patch_size
    layout = "channel" if planes_per_token == 1 else "standard"  # one plane per token: the two layouts agree
    per_token = per_token_loss(pred, target, p, layout, alpha)
    weight = uniform_weight if token_weight is None else token_weight.view_as(per_token)
    dtype = compute_dtype(pred)
    x, y = pred.to(dtype), target.to(dtype)
    fx = torch.fft.fft2(patch_planes(x, p, layout))
    mx, my = fx.abs(), fourier_magnitude(y, p, layout)
    s = torch.where(mx > 0, torch.sign(mx - my) * fx / torch.where(mx > 0, mx, 1), 0)
    g_planes = (p * p) * torch.fft.ifft2(s).real  # (B, N, C', p, p)
    B, N, P = x.shape
    g_fourier = (g_planes.permute(0, 1, 3, 4, 2) if layout == "standard" else g_planes).reshape(B, N, P)
    g = 2 * (1 - alpha) / P * (x - y) + alpha / (planes_per_token * p * p) * g_fourier
    grad.copy_(g * (weight if token_weight is None else weight[..., None]))
    return (per_token * weight).sum().float()


def _reference_scatter(grad_masked, grad_loss, ids_restore):
    B, M, P = grad_masked.shape
    L = ids_restore.shape[1]
    shuffled = torch.cat([grad_masked.new_zeros((B, L - M, P)), grad_masked * grad_loss.to(grad_masked.dtype)], 1)
    return gather_tokens(shuffled, ids_restore)


# kernel name -> loss kernel (the signature above) and the scatter of `masked_mae_loss_backward`
# (grad_masked, grad_loss (0-d), ids_restore) -> the (B, L, P) gradient, zeros at visible tokens
KERNELS: dict[str, Callable] = {"reference": _reference_kernel}
SCATTER_KERNELS: dict[str, Callable] = {"reference": _reference_scatter}


def _run_loss(kernel, pred, target, mask, patch_size, alpha):
    """`mae_fast::mae_loss` computed by a loss kernel: (loss, d loss / d pred)."""
    B, N, P = pred.shape
    weight, uniform = token_weights(mask, B, N)
    pred, target = pred.contiguous(), target.contiguous()
    grad = torch.empty_like(pred)
    loss = kernel(pred, target, weight, uniform, patch_size, P // (patch_size * patch_size), alpha, grad)
    return loss, grad


def _run_masked_loss(kernel, row_map, pred, target, ids_masked, ids_restore, patch_size, alpha):
    """`mae_fast::masked_mae_loss` computed by a loss kernel: (loss, d loss / d pred at the masked tokens (B, M, P),
    ids_masked order); a `row_map` kernel reads the masked rows of the full prediction itself, another gets them
    gathered first."""
    B, M, P = target.shape
    grad = torch.empty(target.shape, dtype=pred.dtype, device=pred.device)
    if row_map:
        pred, row_ids = pred.contiguous(), ids_masked.contiguous()
    else:
        pred, row_ids = gather_tokens(pred, ids_masked).contiguous(), None
    args = (pred, target.contiguous(), None, 1.0 / (B * M), patch_size, P // (patch_size * patch_size), alpha, grad)
    loss = kernel(*args, row_ids) if row_map else kernel(*args)
    return loss, grad


def _mae_loss_default(pred, target, mask, patch_size, alpha):
    """(loss, d loss / d pred) by the reference kernel: the op's default body."""
    implementation.record(OP, "reference")
    return _run_loss(_reference_kernel, pred, target, mask, patch_size, alpha)


mae_loss_op = torch.library.custom_op("mae_fast::mae_loss", _mae_loss_default, mutates_args=(), schema=(
    "(Tensor pred, Tensor target, Tensor? mask, int patch_size, float alpha) -> (Tensor, Tensor)"))


@mae_loss_op.register_fake
def _(pred, target, mask, patch_size, alpha):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None, None


mae_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _masked_mae_loss_default(pred, target, ids_masked, ids_restore, patch_size, alpha):
    """(loss, d loss / d pred at the masked tokens (B, M, P), ids_masked order) by the reference kernel: the op's
    default body."""
    implementation.record(MASKED_OP, "reference")
    return _run_masked_loss(_reference_kernel, True, pred, target, ids_masked, ids_restore, patch_size, alpha)


masked_mae_loss_op = torch.library.custom_op("mae_fast::masked_mae_loss", _masked_mae_loss_default, mutates_args=(),
                                             schema=("(Tensor pred, Tensor target, Tensor ids_masked, "
                                                     "Tensor ids_restore, int patch_size, float alpha) "
                                                     "-> (Tensor, Tensor)"))


@masked_mae_loss_op.register_fake
def _(pred, target, ids_masked, ids_restore, patch_size, alpha):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(target.shape)


def _scatter_default(grad_masked, grad_loss, ids_restore):
    """The gradient of the full prediction: the masked tokens' one scaled by d out / d loss, scattered back (the
    reference scatter: the op's default body)."""
    implementation.record(SCATTER_OP, "reference")
    return _reference_scatter(grad_masked, grad_loss, ids_restore)


masked_mae_loss_backward_op = torch.library.custom_op(
    "mae_fast::masked_mae_loss_backward", _scatter_default, mutates_args=(),
    schema="(Tensor grad_masked, Tensor grad_loss, Tensor ids_restore) -> Tensor")


@masked_mae_loss_backward_op.register_fake
def _(grad_masked, grad_loss, ids_restore):
    B, _, P = grad_masked.shape
    return grad_masked.new_empty((B, ids_restore.shape[1], P))


def _masked_setup_context(ctx, inputs, output):
    _, _, _, ids_restore, _, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad, ids_restore)


@torch.autograd.function.once_differentiable
def _masked_backward(ctx, grad_loss, _grad_of_grad):
    grad, ids_restore = ctx.saved_tensors
    return masked_mae_loss_backward_op(grad, grad_loss, ids_restore), None, None, None, None, None


masked_mae_loss_op.register_autograd(_masked_backward, setup_context=_masked_setup_context)


# op -> device -> the kernel registered for its tensors (filled by register_kernel)
REGISTERED: dict[str, dict[str, str]] = {
    OP: implementation.define(OP, mae_loss_op, _mae_loss_default),
    MASKED_OP: implementation.define(MASKED_OP, masked_mae_loss_op, _masked_mae_loss_default),
    SCATTER_OP: implementation.define(SCATTER_OP, masked_mae_loss_backward_op, _scatter_default),
}


def register_kernel(name: str, device: str, kernel: Callable, check: Callable, *, row_map: bool = False,
                    scatter: Callable | None = None, scatter_check: Callable | None = None) -> None:
    """Register loss kernel `kernel` as kernel `name` of `mae_loss` and `masked_mae_loss` for tensors of `device`;
    `check(pred, target, mask, patch_size)` raises UnsupportedInput for inputs it cannot take. `row_map`: the
    kernel reads the masked rows of the full prediction itself (`row_ids`); `scatter`: its kernel of
    `masked_mae_loss_backward` (else that op runs its default body), `scatter_check(grad_masked, grad_loss,
    ids_restore)` its input check."""
    KERNELS[name] = kernel
    implementation.register_device_kernel(
        OP, device, name, functools.partial(_run_loss, kernel),
        lambda pred, target, mask, patch_size, alpha: check(pred, target, mask, patch_size))
    implementation.register_device_kernel(
        MASKED_OP, device, name, functools.partial(_run_masked_loss, kernel, row_map),
        lambda pred, target, ids_masked, ids_restore, patch_size, alpha: check(pred, target, None, patch_size))
    if scatter is not None:
        SCATTER_KERNELS[name] = scatter
        implementation.register_device_kernel(SCATTER_OP, device, name, scatter, scatter_check)


def check_fused_loss_input(pred, target, mask, patch_size, patch_sizes=None) -> None:
    """What the fused loss kernels take: float32/bfloat16/float16 pred and target, and the patch sizes they have
    instances for (`patch_sizes`, None: any)."""
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UnsupportedInput(f"{name} of dtype {t.dtype}")
    if patch_sizes is not None and patch_size not in patch_sizes:
        raise UnsupportedInput(f"patch size {patch_size} (kernels for {patch_sizes})")


def _gradient_refused(target, mask) -> str | None:
    """Why the ops cannot compute this call, whatever kernel runs them: they give no gradient to target or mask."""
    if not torch.is_grad_enabled():
        return None
    if target.requires_grad:
        return "a target that requires grad"
    if mask is not None and mask.requires_grad:
        return "a mask that requires grad"
    return None


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
    patch_size: int, layout: str = "standard", alpha: float = 0.01, impl: str = "auto",
) -> torch.Tensor:
    """Per-token reconstruction loss averaged over the tokens where `mask` is 1 (all tokens if mask is None).

    pred, target: (B, N, P) in `layout`. Per token: (1-alpha) * mean squared error over its pixels
    + alpha * mean over channels and frequencies of | |FFT2(pred plane)| - |FFT2(target plane)| |.
    The fused kernels compute the loss and its gradient with respect to `pred` in one pass; gradients with
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
    if implementation.runs_reference(OP, impl):
        return mae_loss_reference(pred, target, mask, patch_size, layout, float(alpha))
    why = _gradient_refused(target, mask)
    if why:
        implementation.refuse(OP, impl, why)
        return mae_loss_reference(pred, target, mask, patch_size, layout, float(alpha))
    return implementation.call(OP, impl, pred.device, mae_loss_op, pred, target, mask, patch_size, float(alpha))[0]


def no_tokens_loss(pred: torch.Tensor) -> torch.Tensor:
    """The loss over no tokens (mask ratio 0: nothing masked): 0, with a zero gradient for `pred`."""
    return pred.float().sum() * 0.0 + 0.0  # + 0.0: not -0.0


def masked_mae_loss_reference(pred, target, masking, patch_size, layout, alpha):
    return mae_loss_reference(gather_tokens(pred, masking.ids_masked), target, None, patch_size, layout, alpha)


def masked_mae_loss(
    pred: torch.Tensor, target: torch.Tensor, masking: Masking, *,
    patch_size: int, layout: str = "standard", alpha: float = 0.01, impl: str = "auto",
) -> torch.Tensor:
    """The loss of the decoder's full prediction on the masked tokens: `mae_loss(gather_tokens(pred,
    masking.ids_masked), target, ...)`, with its gradient. pred: (B, L, P); target: (B, L - len_keep, P) in
    `masking.ids_masked` order. The Triton kernel reads the masked rows of pred in place and writes the (B, L, P)
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
    if implementation.runs_reference(MASKED_OP, impl):
        return masked_mae_loss_reference(pred, target, masking, patch_size, layout, float(alpha))
    why = _gradient_refused(target, None)
    if why:
        implementation.refuse(MASKED_OP, impl, why)
        return masked_mae_loss_reference(pred, target, masking, patch_size, layout, float(alpha))
    return implementation.call(MASKED_OP, impl, pred.device, masked_mae_loss_op, pred, target,
                               masking.ids_masked.contiguous(), masking.ids_restore, patch_size, float(alpha))[0]
