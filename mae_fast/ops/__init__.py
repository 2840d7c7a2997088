"""The fused ops of mae_fast: one torch op per fused op, each with its reference and the kernels registered for it.

    op               torch op, reference, registrations   Triton kernel (cuda)        C++ kernel (cpu)
    masked_patchify  mae_fast/ops/masked_patchify.py      kernels/masked_patchify.py  csrc/masked_patchify.cpp
    unshuffle        mae_fast/ops/unshuffle.py            kernels/unshuffle.py        csrc/unshuffle.cpp
    mae_loss         mae_fast/ops/mae_loss.py             kernels/mae_loss.py         csrc/mae_loss.cpp
    masked_mae_loss  (the same, on the full prediction)   kernels/mae_loss.py         (gather + csrc/mae_loss.cpp)
    lion_update      mae_fast/ops/lion.py                 kernels/lion.py             csrc/lion.cpp

PyTorch's dispatcher picks the kernel by the tensors' device: the C++ kernels are registered for "cpu", the Triton
kernels for "cuda" (`REGISTERED` of each op module), the reference is each op's default body. `implementation.py`
holds the registration helper, the one override (`use_impl(name)` or MAE_FAST_IMPL=reference|cpp|triton; `impl=`
for one call) and the fallback counter; `layout.py` what the ops share (pixel scaling, standardisation, token
layouts, masking). Registration goes one way: `cpp.py` (the C++ kernels) and `triton.py` (which imports kernels/)
register into the op modules, and only this package's __init__ imports them. Use the functions through this
package: `from mae_fast import ops; ops.mae_loss(...)`; `ops.last_impl(op)` says which implementation ran.
"""
from mae_fast.ops.implementation import (IMPLS, UnsupportedInput, available_impls, fallbacks, last_impl,
                                         use_impl)
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
from mae_fast.ops.lion import LION_IMPLS, lion_update
from mae_fast.ops.mae_loss import fourier_magnitude, mae_loss, masked_mae_loss, patch_planes, token_weights
from mae_fast.ops.masked_patchify import MaskedPatches, masked_patchify, standardized_tokens
from mae_fast.ops.unshuffle import unshuffle
from mae_fast.ops import triton as _triton

try:
    from mae_fast.ops import cpp as _cpp  # noqa: F401  (registers the C++ kernels)
except ImportError:  # the extension is not built: the ops keep their other kernels
    pass
if _triton.wanted():
    _triton.load()

__all__ = [
    "IMPLS", "LAYOUTS", "LION_IMPLS", "STANDARDIZE_EPS", "MaskedPatches", "Masking", "UnsupportedInput",
    "available_impls", "channel_stats", "check_masking", "fallbacks", "fourier_magnitude", "gather_tokens",
    "last_impl", "lion_update", "mae_loss", "masked_mae_loss", "masked_patchify", "num_visible", "patch_planes",
    "patchify", "pixel_scale", "random_masking", "self_standardize", "standardize", "standardize_eps",
    "standardized_tokens", "to_unit_float", "token_weights", "unpatchify", "unshuffle", "use_impl",
]
