"""The C++ CPU kernels of csrc/ (the optional extension `mae_fast._C`, which registers them as the ops
`torch.ops.mae_fast.<kernel>_out` etc. with TORCH_LIBRARY_IMPL): their fake implementations (csrc/module.cpp names
this module as the place to find them) and their registration as the "cpp" kernel of each fused op for CPU
tensors (`register_kernel(name, "cpu", ...)` of the op module: `CustomOpDef.register_kernel("cpu", ...)`).

Imported by `mae_fast.ops` (an ImportError when the extension is not built: the ops keep their other kernels).
Each kernel's check says what it takes; the op's default body (its reference) runs otherwise.
"""
from __future__ import annotations

import torch

import mae_fast._C  # noqa: F401  (loads the torch.ops.mae_fast library; ImportError when not built)
from mae_fast.ops.implementation import UnsupportedInput
from mae_fast.ops.lion import LionScalars, check_lion_device, lion_groups, lion_update_rest
from mae_fast.ops.lion import register_kernel as register_lion
from mae_fast.ops.mae_loss import check_fused_loss_input
from mae_fast.ops.mae_loss import register_kernel as register_loss
from mae_fast.ops.masked_patchify import check_fused_patchify_input
from mae_fast.ops.masked_patchify import register_kernel as register_patchify
from mae_fast.ops.unshuffle import check_fused_unshuffle_backward_input, check_fused_unshuffle_input
from mae_fast.ops.unshuffle import register_kernel as register_unshuffle
from mae_fast.ops.layout import pixel_scale, standardize_eps

_lib = torch.ops.mae_fast


def _on_cpu(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise UnsupportedInput(f"a {t.device.type} tensor (the C++ kernels run on the CPU)")


# ------------------------------------------------------------------------------------------------------------
# Fake implementations of the C++ ops (the out-style ops write the caller's buffers and return nothing new)
# ------------------------------------------------------------------------------------------------------------

@torch.library.register_fake("mae_fast::channel_stats")
def _channel_stats_fake(images, scale, eps):
    B, C = images.shape[:2]
    return images.new_empty((B, C), dtype=torch.float32), images.new_empty((B, C), dtype=torch.float32)


@torch.library.register_fake("mae_fast::masked_patchify_out")
def _masked_patchify_out_fake(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, scale, visible,
                              target):
    return None


@torch.library.register_fake("mae_fast::unshuffle_out")
def _unshuffle_out_fake(x, mask_token, ids_restore, pos_embed, prefix, out):
    return None


@torch.library.register_fake("mae_fast::unshuffle_backward_out")
def _unshuffle_backward_out_fake(grad_out, ids_restore, prefix, grad_x):
    return grad_out.new_empty((grad_out.shape[-1],), dtype=torch.float32)


@torch.library.register_fake("mae_fast::mae_loss_out")
def _mae_loss_out_fake(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.register_fake("mae_fast::lion_update_")
def _lion_update_fake(params, grads, exp_avgs, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2):
    return None


# ------------------------------------------------------------------------------------------------------------
# Masked patchify
# ------------------------------------------------------------------------------------------------------------

def channel_stats_cpp(images: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel (mean, rstd) of the unit-scaled images, (B, C) float32 each; eps defaults to
    `standardize_eps(images.dtype)`."""
    eps = standardize_eps(images.dtype) if eps is None else eps
    return _lib.channel_stats(images, pixel_scale(images.dtype), eps)


def masked_patchify_cpp(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target):
    """The kernel of `masked_patchify` (statistics first when not given, then one pass writing both outputs)."""
    if mean is None or rstd is None:
        mean, rstd = channel_stats_cpp(images)
    _lib.masked_patchify_out(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout,
                             pixel_scale(images.dtype), visible, target)


def _check_patchify(images, ids_restore, patch_size):
    _on_cpu(images, ids_restore)
    check_fused_patchify_input(images, ids_restore)


# ------------------------------------------------------------------------------------------------------------
# Unshuffle
# ------------------------------------------------------------------------------------------------------------

def unshuffle_forward_cpp(x_visible, mask_token, ids_restore, pos_embed, prefix: int = 0, *, out=None):
    """Forward (prefix rows placed by the kernel); mask_token and pos_embed already in the output dtype, which `out`
    has (allocated in mask_token's dtype when not given); x_visible read in its own dtype."""
    B, _, D = x_visible.shape
    if out is None:
        out = torch.empty((B, prefix + ids_restore.shape[1], D), dtype=mask_token.dtype)
    _lib.unshuffle_out(x_visible, mask_token, ids_restore.contiguous(), pos_embed, prefix, out)
    return out


def unshuffle_backward_cpp(grad_out, ids_restore, grad_x, prefix: int = 0) -> torch.Tensor:
    """Fills grad_x (B, prefix + K, D) in its own dtype from grad_out; returns the mask token's float32 gradient."""
    return _lib.unshuffle_backward_out(grad_out, ids_restore.contiguous(), prefix, grad_x)


def _check_unshuffle(x_visible, mask_token, ids_restore, pos_embed, out_dtype):
    _on_cpu(x_visible, mask_token, ids_restore, pos_embed)
    check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed, out_dtype)


def _check_unshuffle_backward(grad_out, ids_restore, x_dtype):
    _on_cpu(grad_out, ids_restore)
    check_fused_unshuffle_backward_input(grad_out, ids_restore, x_dtype)


# ------------------------------------------------------------------------------------------------------------
# MAE loss
# ------------------------------------------------------------------------------------------------------------

def mae_loss_cpp(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad):
    """Loss (float32 scalar) and d loss / d pred written into `grad`, in one pass."""
    if target.dtype not in (torch.float32, pred.dtype):  # the kernel takes float32 targets or pred's dtype
        target = target.float()
    return _lib.mae_loss_out(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad)


def _check_loss(pred, target, mask, patch_size):
    _on_cpu(pred, target, mask)
    check_fused_loss_input(pred, target, mask, patch_size)


# ------------------------------------------------------------------------------------------------------------
# Lion
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def lion_update_cpp(params, grads, exp_avgs, lr, beta1, beta2, weight_decay) -> None:
    """One parallel pass per dtype combination; tensors no kernel takes go through the reference."""
    s = LionScalars.make(lr, beta1, beta2, weight_decay)
    groups, rest = lion_groups(params, grads, exp_avgs)
    for ps, gs, ms in groups.values():
        _lib.lion_update_(ps, gs, ms, s.lr, s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2)
    lion_update_rest(rest, params, grads, exp_avgs, lr, beta1, beta2, weight_decay)


register_patchify("cpp", "cpu", masked_patchify_cpp, _check_patchify)
register_unshuffle("cpp", "cpu", unshuffle_forward_cpp, unshuffle_backward_cpp, _check_unshuffle,
                   _check_unshuffle_backward)
register_loss("cpp", "cpu", mae_loss_cpp, _check_loss)
register_lion("cpp", "cpu", lion_update_cpp, check_lion_device("cpu"))
