"""Masked patchify + self-standardisation: raw images -> standardised visible tokens and masked targets in one pass.

The torch op `mae_fast::masked_patchify` (no autograd: images are data):
    definition   `masked_patchify_op` below (schema, fake); its default body is the reference kernel
                 `_reference_write`
    reference    `masked_patchify_reference` (standardise, patchify, gather): what the public functions run for
                 impl="reference" or MAE_FAST_IMPL=reference
    kernels      `REGISTERED` ({op: {device: kernel name}}, filled by `register_kernel`):
                 cpu   cpp     csrc/masked_patchify.cpp (registered by mae_fast/ops/cpp.py)
                 cuda  triton  kernels/masked_patchify.py
A kernel is `write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target)`: it fills
visible (B, len_keep, P) in its dtype and target (B, L - len_keep, P) float32, computing the per-image per-channel
statistics itself when mean and rstd are None; `VISIBLE_DTYPES[kernel]` are the visible dtypes it writes (another
one is written as float32 and cast).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from mae_fast.ops import implementation
from mae_fast.ops.implementation import UnsupportedInput
from mae_fast.ops.layout import (LAYOUTS, Masking, check_masking, gather_tokens, patchify, pixel_scale, random_masking,
                                 self_standardize, standardize_eps, to_unit_float)  # noqa: F401 (the kernels' formula)

OP = "masked_patchify"


@dataclass
class MaskedPatches:
    visible: torch.Tensor   # (B, len_keep, P) standardised visible tokens, in shuffled order
    target: torch.Tensor    # (B, L - len_keep, P) standardised masked tokens, in shuffled order (the loss target)
    masking: Masking


def masked_patchify_reference(images, patch_size, masking, layout, stats=None, out_dtype=torch.float32):
    if stats is None:
        x = self_standardize(images)
    else:
        x = to_unit_float(images, check_range=False)
        mean, rstd = stats
        x = (x - mean[:, :, None, None]) * rstd[:, :, None, None]
    tokens = patchify(x, patch_size, layout)
    visible = gather_tokens(tokens, masking.ids_keep).to(out_dtype)
    return MaskedPatches(visible, gather_tokens(tokens, masking.ids_masked), masking)


def _reference_write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target):
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    masking = Masking(ids_shuffle, ids_restore, ids_restore >= len_keep, len_keep)
    stats = None if mean is None else (mean, rstd)
    out = masked_patchify_reference(images, patch_size, masking, "channel" if channel_layout else "standard", stats)
    visible.copy_(out.visible)
    target.copy_(out.target)


KERNELS: dict[str, Callable] = {"reference": _reference_write}  # kernel name -> write (the signature above)
VISIBLE_DTYPES: dict[str, tuple] = {"reference": (torch.float32, torch.bfloat16, torch.float16)}


def patchify_buffers(images, num_tokens, len_keep, patch_size, channel_layout, visible_dtype=torch.float32):
    """Empty (visible (B, len_keep, P) in `visible_dtype`, target (B, L - len_keep, P) float32) on images' device."""
    B, C = images.shape[:2]
    P = patch_size * patch_size * (1 if channel_layout else C)
    return (images.new_empty((B, len_keep, P), dtype=visible_dtype),
            images.new_empty((B, num_tokens - len_keep, P), dtype=torch.float32))


def _run(write, visible_dtypes, images, ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype):
    """`mae_fast::masked_patchify` computed by a kernel: (visible in out_dtype, target float32)."""
    written = out_dtype if out_dtype in visible_dtypes else torch.float32
    visible, target = patchify_buffers(images, ids_restore.shape[1], len_keep, patch_size, channel_layout, written)
    if mean is not None and rstd is not None:
        mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    else:
        mean = rstd = None
    write(images, mean, rstd, ids_restore.contiguous(), len_keep, patch_size, channel_layout, visible, target)
    return visible.to(out_dtype), target


def _default(images, ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype):
    """The op by the reference kernel: its default body."""
    implementation.record(OP, "reference")
    return _run(_reference_write, VISIBLE_DTYPES["reference"], images, ids_restore, len_keep, patch_size,
                channel_layout, mean, rstd, out_dtype)


masked_patchify_op = torch.library.custom_op("mae_fast::masked_patchify", _default, mutates_args=(), schema=(
    "(Tensor images, Tensor ids_restore, int len_keep, int patch_size, bool channel_layout, Tensor? mean, "
    "Tensor? rstd, ScalarType out_dtype) -> (Tensor, Tensor)"))


@masked_patchify_op.register_fake
def _(images, ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype):
    return patchify_buffers(images, ids_restore.shape[1], len_keep, patch_size, channel_layout, out_dtype)


REGISTERED: dict[str, dict[str, str]] = {OP: implementation.define(OP, masked_patchify_op, _default)}


def register_kernel(name: str, device: str, write: Callable, check: Callable,
                    visible_dtypes: tuple = (torch.float32,)) -> None:
    """Register `write` as kernel `name` of this op for tensors of `device`; `check(images, ids_restore,
    patch_size)` raises UnsupportedInput for inputs it cannot take."""
    KERNELS[name] = write
    VISIBLE_DTYPES[name] = visible_dtypes
    implementation.register_device_kernel(
        OP, device, name, functools.partial(_run, write, visible_dtypes),
        lambda images, ids_restore, len_keep, patch_size, *_: check(images, ids_restore, patch_size))


def check_fused_patchify_input(images: torch.Tensor, ids_restore: torch.Tensor) -> None:
    """The fused kernels take uint8/uint16/int32/float16/bfloat16/float32 pixels and int64 permutations."""
    if images.dtype not in (torch.uint8, torch.uint16, torch.int32, torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedInput(f"images of dtype {images.dtype}")
    if images.shape[1] > 16:
        raise UnsupportedInput(f"{images.shape[1]} channels (the kernels take at most 16)")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")


def masked_patchify(
    images: torch.Tensor,
    patch_size: int,
    mask_ratio: float,
    layout: str = "standard",
    generator: torch.Generator | None = None,
    masking: Masking | None = None,
    impl: str = "auto",
    *,
    seed: int | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> MaskedPatches:
    """Raw images (B, C, H, W; uint8/uint16/float in [0,1]) -> self-standardised visible tokens + masked targets.

    The random permutation is drawn here, reproducibly through `generator` or an integer `seed` (the same draw for
    every kernel: torch.rand + argsort, as FAIR's MAE), unless `masking` is given. The fused kernels then write
    both outputs in one pass over the image, using per-image per-channel statistics from a first reduction, or
    `stats` = (mean, rstd), each (B, C) float32 of the [0, 1]-scaled images, when the caller has them already.
    `out_dtype`: the dtype of the visible tokens (what the patch embedding reads): by default the autocast dtype
    when autocast is on for the images' device, else float32. The target (the loss's) stays float32.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    pixel_scale(images.dtype)  # rejects unsupported dtypes with a clear message
    L = (H // patch_size) * (W // patch_size) * (C if layout == "channel" else 1)
    if masking is None:
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either generator or seed, not both")
            generator = torch.Generator(device=images.device).manual_seed(int(seed))
        masking = random_masking(B, L, mask_ratio, images.device, generator)
    elif masking.ids_shuffle.shape != (B, L):
        raise ValueError(f"masking covers {tuple(masking.ids_shuffle.shape)} tokens, images give {(B, L)}")
    else:
        check_masking(masking)
    if stats is not None:
        if len(stats) != 2 or any(t.shape != (B, C) for t in stats):
            raise ValueError(f"stats must be (mean, rstd), each of shape {(B, C)}")
    if out_dtype is None:
        device_type = images.device.type
        autocast = torch.is_autocast_enabled(device_type)
        out_dtype = torch.get_autocast_dtype(device_type) if autocast else torch.float32
    with torch.no_grad():  # images are data: no gradient flows into them
        if implementation.runs_reference(OP, impl):
            return masked_patchify_reference(images, patch_size, masking, layout, stats, out_dtype)
        mean, rstd = (None, None) if stats is None else stats
        visible, target = implementation.call(OP, impl, images.device, masked_patchify_op, images,
                                              masking.ids_restore, masking.len_keep, patch_size, layout == "channel",
                                              mean, rstd, out_dtype)
        return MaskedPatches(visible, target, masking)


def standardized_tokens(images: torch.Tensor, patch_size: int, layout: str = "standard",
                        impl: str = "auto") -> torch.Tensor:
    """Raw images -> every token, self-standardised, in order (B, L, P) float32: inference's front end. The fused
    kernels of `masked_patchify` with an identity permutation and nothing masked write the tokens in one pass
    after the statistics pass; the reference is standardize + patchify."""
    B, C, H, W = images.shape
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    pixel_scale(images.dtype)
    L = (H // patch_size) * (W // patch_size) * (C if layout == "channel" else 1)
    if implementation.runs_reference(OP, impl):  # no identity gather
        return patchify(self_standardize(images), patch_size, layout)
    ids = torch.arange(L, device=images.device).expand(B, L).contiguous()
    with torch.no_grad():
        return implementation.call(OP, impl, images.device, masked_patchify_op, images, ids, L, patch_size,
                                   layout == "channel", None, None, torch.float32)[0]
