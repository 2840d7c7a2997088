"""The fused ops of mae_fast: one public function per op, each in up to three forms under one name.

    op               reference + torch op (here)        Triton (CUDA)            C++ (CPU)
    masked_patchify  mae_fast/ops/masked_patchify.py    kernels/masked_patchify.py  csrc/masked_patchify.cpp
    unshuffle        mae_fast/ops/unshuffle.py          kernels/unshuffle.py        csrc/unshuffle.cpp
    mae_loss         mae_fast/ops/mae_loss.py           kernels/mae_loss.py         csrc/mae_loss.cpp
    masked_mae_loss  (the same, on the full prediction) kernels/mae_loss.py         (gather + csrc/mae_loss.cpp)
    lion_update      mae_fast/ops/lion.py               kernels/lion.py             csrc/lion.cpp

`dispatch.py` picks the backend (Triton for CUDA tensors, C++ for CPU tensors, the reference otherwise, or
`impl=` / MAE_FAST_IMPL); `layout.py` holds what the ops share (pixel scaling, standardisation, token layouts,
masking); `mae_fast.backends` wraps the compiled kernels. Use the functions through this package:
`from mae_fast import ops; ops.mae_loss(...)`.
"""
from mae_fast.ops.dispatch import IMPLS, UnsupportedInput, available_impls, choose_impl, last_impl, load_fast_backends
from mae_fast.ops.layout import (
    LAYOUTS,
    STANDARDIZE_EPS,
    Masking,
    channel_stats,
    check_masking,
    gather_tokens,
    num_visible,
    patchify,
    pixel_scale,
    random_masking,
    self_standardize,
    standardize,
    standardize_eps,
    to_unit_float,
    unpatchify,
)
from mae_fast.ops.lion import LION_DTYPES, LionScalars, lion_fusable, lion_groups, lion_update, lion_update_rest
from mae_fast.ops.mae_loss import (
    check_fused_loss_input,
    define_mae_loss_op,
    fourier_magnitude,
    fused_mae_loss,
    mae_loss,
    masked_mae_loss,
    patch_planes,
    token_weights,
)
from mae_fast.ops.masked_patchify import (
    MaskedPatches,
    check_fused_patchify_input,
    define_masked_patchify_op,
    masked_patchify,
    masked_patchify_outputs,
    standardized_tokens,
)
from mae_fast.ops.unshuffle import check_fused_unshuffle_input, define_unshuffle_op, unshuffle

__all__ = [
    "IMPLS", "LAYOUTS", "LION_DTYPES", "STANDARDIZE_EPS", "LionScalars", "MaskedPatches", "Masking", "UnsupportedInput",
    "available_impls", "channel_stats", "check_fused_loss_input", "check_fused_patchify_input",
    "check_fused_unshuffle_input", "check_masking", "choose_impl", "define_mae_loss_op", "define_masked_patchify_op",
    "define_unshuffle_op", "fourier_magnitude", "fused_mae_loss", "gather_tokens", "last_impl", "lion_fusable",
    "lion_groups", "lion_update", "lion_update_rest", "load_fast_backends", "mae_loss", "masked_patchify",
    "masked_mae_loss", "masked_patchify_outputs", "num_visible", "patch_planes", "patchify", "pixel_scale", "random_masking",
    "self_standardize", "standardize", "standardize_eps", "standardized_tokens", "to_unit_float", "token_weights",
    "unpatchify", "unshuffle",
]
