"""The "cpp" backends: thin wrappers of the C++ CPU kernels in csrc/ (torch.ops.mae_fast, loaded by mae_fast._C).

Imported by `mae_fast.ops.dispatch` on the first dispatch (an ImportError when the extension is not built). Each wrapper checks what its kernel takes and raises
`ops.UnsupportedInput` otherwise (auto dispatch then runs the reference). The keyword-only output arguments
exist for tests that poison outputs before a call.

torch.compile: every C++ op gets a fake (meta) implementation here (csrc/module.cpp names this module as the
place to find them), and the dispatch goes through the functional ops `mae_fast::masked_patchify_cpp`,
`unshuffle_cpp` (+ `_backward`) and `mae_loss_cpp` (defined by the `ops.define_*_op` factories: fakes and autograd
formulas), so that a compiled train step holds each fused op as one opaque node and no graph breaks.
"""
from __future__ import annotations

import torch

from mae_fast import _C  # noqa: F401  (loads the torch.ops.mae_fast library; ImportError when not built)
from mae_fast import ops

_lib = torch.ops.mae_fast


def _check_cpu(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ops.UnsupportedInput(f"a {t.device.type} tensor (the C++ kernels run on the CPU)")


# ------------------------------------------------------------------------------------------------------------
# Fake implementations of the C++ ops (shapes and dtypes as the kernels produce them; mutated outputs are the
# caller's buffers, so the out-style ops return nothing new but their own fresh results)
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
    `ops.standardize_eps(images.dtype)`."""
    eps = ops.standardize_eps(images.dtype) if eps is None else eps
    return _lib.channel_stats(images, ops.pixel_scale(images.dtype), eps)


def _masked_patchify_write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target):
    _lib.masked_patchify_out(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout,
                             ops.pixel_scale(images.dtype), visible, target)


_masked_patchify = ops.define_masked_patchify_op("cpp", channel_stats_cpp, _masked_patchify_write)


def masked_patchify_cpp(images, patch_size, masking, layout, stats=None, out_dtype=torch.float32, *, visible=None,
                        target=None):
    """Backend of `ops.masked_patchify` for CPU tensors -> ops.MaskedPatches (visible cast to `out_dtype`)."""
    _check_cpu(images)
    ops.check_fused_patchify_input(images, masking)
    return _masked_patchify(images, patch_size, masking, layout, stats, out_dtype, visible=visible, target=target)


# ------------------------------------------------------------------------------------------------------------
# Unshuffle
# ------------------------------------------------------------------------------------------------------------

def unshuffle_forward_cpp(x_visible, mask_token, ids_restore, pos_embed, prefix: int = 0, *, out=None):
    """Kernel call of the forward (prefix rows placed by the kernel); mask_token and pos_embed already in the output
    dtype, which `out` has (allocated in mask_token's dtype when not given); x_visible read in its own dtype."""
    B, _, D = x_visible.shape
    if out is None:
        out = torch.empty((B, prefix + ids_restore.shape[1], D), dtype=mask_token.dtype)
    _lib.unshuffle_out(x_visible, mask_token, ids_restore.contiguous(), pos_embed, prefix, out)
    return out


def unshuffle_backward_cpp(grad_out, ids_restore, grad_x, prefix: int = 0) -> torch.Tensor:
    """Fills grad_x (B, prefix + K, D) in its own dtype from grad_out; returns the mask token's float32 gradient."""
    return _lib.unshuffle_backward_out(grad_out, ids_restore.contiguous(), prefix, grad_x)


_unshuffle_op = ops.define_unshuffle_op("cpp", unshuffle_forward_cpp, unshuffle_backward_cpp)


def unshuffle_cpp(x_visible, mask_token, ids_restore, pos_embed, prefix=0, out_dtype=None) -> torch.Tensor:
    _check_cpu(x_visible, mask_token, ids_restore, pos_embed)
    ops.check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed, out_dtype)
    return _unshuffle_op(x_visible, mask_token, ids_restore, pos_embed, prefix, out_dtype)


# ------------------------------------------------------------------------------------------------------------
# MAE loss
# ------------------------------------------------------------------------------------------------------------

def mae_loss_forward_cpp(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad):
    """Loss (float32 scalar) and d loss / d pred written into `grad`, in one pass."""
    if target.dtype not in (torch.float32, pred.dtype):  # the kernel takes float32 targets or pred's dtype
        target = target.float()
    return _lib.mae_loss_out(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad)


_mae_loss_op = ops.define_mae_loss_op("cpp", mae_loss_forward_cpp)


def mae_loss_cpp(pred, target, mask, patch_size, layout, alpha) -> torch.Tensor:
    _check_cpu(pred, target, mask)
    ops.check_fused_loss_input(pred, target, mask, patch_size, layout, alpha)
    return ops.fused_mae_loss(_mae_loss_op, pred, target, mask, patch_size, alpha)


def masked_mae_loss_cpp(pred, target, masking, patch_size, layout, alpha) -> torch.Tensor:
    """The loss of the full prediction on its masked tokens: gather (autograd scatters back), then the C++ loss."""
    _check_cpu(pred)
    return mae_loss_cpp(ops.gather_tokens(pred, masking.ids_masked), target, None, patch_size, layout, alpha)


# ------------------------------------------------------------------------------------------------------------
# Lion
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def lion_update_cpp(params, grads, exp_avgs, lr, beta1, beta2, weight_decay) -> None:
    """One parallel pass per dtype combination; tensors no kernel takes go through the reference."""
    _check_cpu(params[0])
    s = ops.LionScalars.make(lr, beta1, beta2, weight_decay)
    groups, rest = ops.lion_groups(params, grads, exp_avgs)
    for ps, gs, ms in groups.values():
        _lib.lion_update_(ps, gs, ms, s.lr, s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2)
    ops.lion_update_rest(rest, params, grads, exp_avgs, lr, beta1, beta2, weight_decay)


def register_all(register) -> None:
    register("masked_patchify", "cpp")(masked_patchify_cpp)
    register("unshuffle", "cpp")(unshuffle_cpp)
    register("mae_loss", "cpp")(mae_loss_cpp)
    register("masked_mae_loss", "cpp")(masked_mae_loss_cpp)
    register("lion_update", "cpp")(lion_update_cpp)
