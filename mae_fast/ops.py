"""The fused ops of mae_fast: one public function per op, one dispatcher.

Each op exists in up to three forms under one name: the plain-PyTorch reference below (the oracle and the last
fallback), a Triton kernel for CUDA tensors (`mae_fast.kernels.<op>`) and a C++ kernel for CPU tensors
(`mae_fast._C`, wrapped by `mae_fast.cpu_ops`, when the extension is built). The dispatcher picks Triton for CUDA
tensors, C++ for CPU tensors, the reference otherwise; `impl="reference"` (or the environment variable
MAE_FAST_IMPL=reference) forces the reference for debugging. A fused backend that cannot take some input (say
float64 for gradcheck, or a patch size it has no kernel for) raises `UnsupportedInput` before doing any work; under
`impl="auto"` the call then runs the reference, and `last_impl(op)` says so.

torch.compile: each fused backend is a torch op with a fake implementation (`mae_fast::<op>_<backend>`, made by the
`define_*_op` factories below; the C++ kernels' own ops get fakes in `mae_fast.cpu_ops`), and ops with a backward
carry an autograd formula, so a compiled train step holds every fused op as one opaque node without graph breaks.
The dispatch itself (environment variable, fallbacks) is traced by Dynamo and guarded; checks that would read
tensor values back to the host (masking permutation, float pixel range) run in eager calls only.

Token layouts (see DESIGN.md §2):
    "standard": (B, L, p*p*C), tokens (h, w) row-major, pixels within a token ordered (p, q, c)
    "channel":  (B, C*L, p*p), channel-major (all patches of channel 0, then channel 1, ...), pixels (p, q)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LAYOUTS = ("standard", "channel")
IMPLS = ("auto", "reference", "triton", "cpp")
STANDARDIZE_EPS = 1e-5

# op name -> backend name -> callable with the reference's signature
_REGISTRY: dict[str, dict[str, Callable]] = {}
_last_impl: dict[str, str] = {}
# "mae_fast::<op>_<backend>" -> what the define_*_op factory below returned for it (torch ops are defined once)
_TORCH_OPS: dict[str, Callable] = {}


class UnsupportedInput(Exception):
    """Raised by a fused backend, before it does any work, for inputs it has no kernel for."""


def register(op: str, backend: str):
    """Decorator: register `fn` as `backend` ("reference", "triton" or "cpp") of `op`."""

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


@torch.compiler.assume_constant_result
def _load_fast_backends() -> None:
    """Import the optional kernel modules once; each registers itself. Missing ones are simply absent.
    torch.compile runs this eagerly when it meets the first call (registering torch ops cannot be traced)."""
    if getattr(_load_fast_backends, "done", False):
        return
    _load_fast_backends.done = True
    try:
        from mae_fast import kernels

        register_all = getattr(kernels, "register_all", None)
        if register_all is not None:
            register_all(register)  # registers nothing when Triton is not importable
    except ImportError:
        pass
    try:
        from mae_fast import _C  # noqa: F401  (loads the torch.ops.mae_fast library)
    except ImportError:
        return
    from mae_fast import cpu_ops

    cpu_ops.register_all(register)


def available_impls(op: str) -> list[str]:
    _load_fast_backends()
    return sorted(_REGISTRY.get(op, {}))


def _resolve(op: str, device: torch.device, impl: str) -> tuple[str, bool]:
    """(backend name, whether the caller asked for it explicitly)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _load_fast_backends()
    backends = _REGISTRY[op]
    if impl == "auto":
        impl = os.environ.get("MAE_FAST_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"environment variable MAE_FAST_IMPL must be one of {IMPLS}, got {impl!r}")
    explicit = impl != "auto"
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpp"
        if impl not in backends:
            impl = "reference"
    if impl not in backends:
        raise RuntimeError(f"op {op!r} has no {impl!r} implementation here (available: {sorted(backends)})")
    return impl, explicit


def choose_impl(op: str, device: torch.device, impl: str = "auto") -> Callable:
    """The implementation of `op` for tensors on `device` (no fallback on unsupported inputs: see `_dispatch`)."""
    name, _ = _resolve(op, device, impl)
    _last_impl[op] = name
    return _REGISTRY[op][name]


def _dispatch(op: str, device: torch.device, impl: str, *args):
    """Run `op` with the chosen backend; an `UnsupportedInput` falls back to the reference unless the backend was
    asked for by name."""
    name, explicit = _resolve(op, device, impl)
    try:
        out = _REGISTRY[op][name](*args)
    except UnsupportedInput as why:
        if explicit and name != "reference":
            raise RuntimeError(f"{op}: the {name!r} implementation cannot take these inputs: {why}") from None
        name = "reference"
        out = _REGISTRY[op]["reference"](*args)
    _last_impl[op] = name
    return out


def last_impl(op: str) -> str | None:
    """Which implementation the last call of `op` used (for tests and benchmark reports)."""
    return _last_impl.get(op)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Input scaling and self-standardisation
# --------------------------------------------------------------------------------------------------------------

def pixel_scale(dtype: torch.dtype) -> float:
    """The divisor that maps raw pixels of `dtype` to [0, 1]: 255 (uint8), 65535 (uint16, or int32 holding
    widened uint16), 1 (float)."""
    if dtype == torch.uint8:
        return 255.0
    if dtype in (torch.uint16, torch.int32):
        return 65535.0
    if dtype.is_floating_point:
        return 1.0
    raise TypeError(f"images must be uint8, uint16 or float in [0, 1], got dtype {dtype}")


def to_unit_float(images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """uint8 / 255, uint16 / 65535 (as float32); float input must already lie in [0, 1]. The range check reads
    min and max back to the host, so torch.compile leaves it out (it would break the graph every step); eager
    calls check."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype == torch.uint16:
        return images.to(torch.int32).float() / 65535.0
    if images.dtype == torch.int32:  # uint16 images loaded through numpy/PIL paths arrive widened
        return images.float() / 65535.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8, uint16 or float in [0, 1], got dtype {images.dtype}")
    if check_range and not torch.compiler.is_compiling():
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must be intensities scaled to [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
                "pass the raw uint8/uint16 pixels instead"
            )
    return images.float()


def standardize_eps(dtype: torch.dtype) -> float:
    """The variance floor of self-standardisation for images of `dtype`, in units of the [0, 1]-scaled pixels.

    The rule: eps is a fixed amount in *raw intensity steps*, STANDARDIZE_EPS * 255^2 = 0.65 steps^2 (a std of
    0.81 steps), where a step is 1/255 for uint8 and 1/65535 for uint16 (and int32 holding widened uint16) and for
    float input (read at 16-bit resolution). So

        eps(dtype) = STANDARDIZE_EPS * (255 / steps_per_unit(dtype))^2:  1e-5 for uint8, 1.51e-10 for uint16/float.

    uint8 stays OpenPhenom's standardisation exactly (x/255, then instance norm with eps 1e-5), and a channel with
    a std of s steps comes out with std s / sqrt(s^2 + 0.65) for every bit depth and brightness: >= 0.9992 for
    s >= 20, where a fixed eps of 1e-5 on uint16/65535 gives 0.70 for s = 200. A flat channel still maps to ~0:
    a deviation of one step becomes at most 1/sqrt(0.65) = 1.24."""
    steps = 255.0 if dtype == torch.uint8 else 65535.0
    pixel_scale(dtype)  # rejects unsupported dtypes with a clear message
    return STANDARDIZE_EPS * (255.0 / steps) ** 2


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel (mean, 1/sqrt(var + eps)) of a [0, 1]-scaled image batch (B, C, H, W): (B, C) each,
    float32 (float64 input: float64). Mean and variance are taken in float64, so a dim 16-bit channel on a bright
    background loses nothing to cancellation. `eps`: `standardize_eps(raw dtype)`."""
    xd = x.double()
    mean = xd.mean(dim=(2, 3))
    var = xd.var(dim=(2, 3), unbiased=False)
    out = _compute_dtype(x)
    return mean.to(out), torch.rsqrt(var + eps).to(out)


def standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-image per-channel standardisation over H x W of a [0, 1]-scaled batch (B, C, H, W); `eps`:
    `standardize_eps(raw dtype)`. This is the op OpenPhenom's input norm runs (InstanceNorm2d without affine), so
    uint8 input gives OpenPhenom's bits; its statistics are single-pass Welford / two-pass sums, not
    E[x^2] - E[x]^2, so a dim 16-bit channel on a bright background keeps its variance (tests/test_ops_reference)."""
    return F.instance_norm(x, eps=eps)


def self_standardize(images: torch.Tensor) -> torch.Tensor:
    """Raw images (uint8 / uint16 / float in [0, 1]) -> per-image per-channel standardised float32, with the
    bit-depth-independent eps of `standardize_eps`. The model input and the loss targets."""
    return standardize(to_unit_float(images, check_range=False), standardize_eps(images.dtype))


# --------------------------------------------------------------------------------------------------------------
# Patchify / unpatchify
# --------------------------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, patch_size: int, layout: str = "standard") -> torch.Tensor:
    """(B, C, H, W) -> tokens in `layout` (see module docstring)."""
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    if layout == "standard":
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)
    if layout == "channel":
        return torch.einsum("nchpwq->nchwpq", x).reshape(B, C * h * w, p * p)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, layout: str = "standard") -> torch.Tensor:
    """Tokens in `layout` -> (B, C, H, W); square images."""
    B, N, P = tokens.shape
    p, C = patch_size, channels
    L = N if layout == "standard" else N // C
    h = int(round(L**0.5))
    if h * h != L:
        raise ValueError(f"{L} tokens per channel do not form a square grid")
    if layout == "standard":
        x = tokens.reshape(B, h, h, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
    elif layout == "channel":
        x = tokens.reshape(B, C, h, h, p, p)
        x = torch.einsum("nchwpq->nchpwq", x)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return x.reshape(B, C, h * p, h * p)


# --------------------------------------------------------------------------------------------------------------
# Random masking
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Masking:
    """A per-row random permutation of L tokens, the first `len_keep` of which stay visible."""

    ids_shuffle: torch.Tensor  # (B, L) token index at each shuffled position
    ids_restore: torch.Tensor  # (B, L) shuffled position of each token (inverse permutation)
    mask: torch.Tensor         # (B, L) 1.0 where the token is removed, in original order
    len_keep: int

    @property
    def ids_keep(self) -> torch.Tensor:   # (B, len_keep)
        return self.ids_shuffle[:, : self.len_keep]

    @property
    def ids_masked(self) -> torch.Tensor:  # (B, L - len_keep)
        return self.ids_shuffle[:, self.len_keep:]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


def random_masking(
    batch: int, num_tokens: int, mask_ratio: float, device=None, generator: torch.Generator | None = None,
) -> Masking:
    """FAIR MAE masking: noise ~ U(0,1) per token, keep the `int(L*(1-r))` tokens of smallest noise."""
    len_keep = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle, ids_restore, mask, len_keep)


def check_masking(masking: Masking) -> None:
    """A caller-supplied masking must be a permutation per row with ids_restore its inverse (the fused kernels
    write token t to slot ids_restore[b, t] without bounds checks). Under torch.compile only the shapes are
    checked: the value checks read the permutation back to the host (a graph break every step), and they are a
    debugging aid for hand-made maskings; run the step eagerly once to validate one."""
    B, L = masking.ids_shuffle.shape
    if masking.ids_restore.shape != (B, L) or not 0 <= masking.len_keep <= L:
        raise ValueError(f"masking: ids_restore {tuple(masking.ids_restore.shape)} and len_keep "
                         f"{masking.len_keep} do not match ids_shuffle {(B, L)}")
    if torch.compiler.is_compiling():
        return
    ids = masking.ids_restore.long()
    if int(ids.min()) < 0 or int(ids.max()) >= L:
        raise ValueError(f"masking: ids_restore holds values outside [0, {L})")
    positions = torch.arange(L, device=ids.device).expand(B, L)
    if not torch.equal(torch.gather(masking.ids_shuffle.long(), 1, ids), positions):
        raise ValueError("masking: ids_restore is not the inverse permutation of ids_shuffle")


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, P), ids (B, K) -> (B, K, P)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class MaskedPatches:
    visible: torch.Tensor   # (B, len_keep, P) standardised visible tokens, in shuffled order
    target: torch.Tensor    # (B, L - len_keep, P) standardised masked tokens, in shuffled order (the loss target)
    masking: Masking


@register("masked_patchify", "reference")
def _masked_patchify_reference(images, patch_size, masking, layout, stats=None, out_dtype=torch.float32):
    if stats is None:
        x = self_standardize(images)
    else:
        x = to_unit_float(images, check_range=False)
        mean, rstd = stats
        x = (x - mean[:, :, None, None]) * rstd[:, :, None, None]
    tokens = patchify(x, patch_size, layout)
    visible = gather_tokens(tokens, masking.ids_keep).to(out_dtype)
    return MaskedPatches(visible, gather_tokens(tokens, masking.ids_masked), masking)


def masked_patchify_outputs(
    images: torch.Tensor, patch_size: int, masking: Masking, layout: str,
    visible: torch.Tensor | None = None, target: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (visible in `out_dtype`, target float32) buffers a fused masked-patchify writes (given ones are checked,
    for tests that poison them first)."""
    B, C, H, W = images.shape
    L = masking.ids_restore.shape[1]
    P = patch_size * patch_size * (1 if layout == "channel" else C)
    shapes = {"visible": (B, masking.len_keep, P), "target": (B, L - masking.len_keep, P)}
    dtypes = {"visible": out_dtype, "target": torch.float32}
    out = []
    for name, given in (("visible", visible), ("target", target)):
        if given is None:
            given = torch.empty(shapes[name], dtype=dtypes[name], device=images.device)
        elif given.shape != shapes[name] or given.dtype != dtypes[name] or not given.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtypes[name]} tensor of shape {shapes[name]}, got "
                             f"{tuple(given.shape)} {given.dtype}")
        out.append(given)
    return out[0], out[1]


def define_masked_patchify_op(backend: str, channel_stats: Callable | None, write: Callable,
                              out_dtypes: tuple = (torch.float32,)) -> Callable:
    """A fused backend of `masked_patchify` around the torch op `mae_fast::masked_patchify_{backend}(images,
    ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype) -> (visible, target)`, which has a
    fake implementation, so that torch.compile keeps it as one opaque node (no autograd: images are data).

    `channel_stats(images) -> (mean, rstd)`, (B, C) float32 each, when no stats are given (None: `write` takes
    mean = rstd = None and computes them itself, in the same pass schedule);
    `write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target)` fills the
    outputs: visible in its dtype (one of `out_dtypes`; another one is written as float32 and cast), target float32.
    Returns `fn(images, patch_size, masking, layout, stats=None, out_dtype=float32, *, visible=None, target=None)
    -> MaskedPatches`; given output buffers (tests poison them first) are written directly, without the torch op."""
    name = f"mae_fast::masked_patchify_{backend}"
    if name in _TORCH_OPS:
        return _TORCH_OPS[name]

    def float_stats(images, mean, rstd):
        if mean is None or rstd is None:
            return (None, None) if channel_stats is None else channel_stats(images)
        return mean.float().contiguous(), rstd.float().contiguous()

    def written_dtype(out_dtype):
        return out_dtype if out_dtype in out_dtypes else torch.float32

    @torch.library.custom_op(name, mutates_args=(), schema=(
        "(Tensor images, Tensor ids_restore, int len_keep, int patch_size, bool channel_layout, Tensor? mean, "
        "Tensor? rstd, ScalarType out_dtype) -> (Tensor, Tensor)"))
    def masked_patchify_op(images, ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype):
        mean, rstd = float_stats(images, mean, rstd)
        visible, target = _patchify_buffers(images, ids_restore.shape[1], len_keep, patch_size, channel_layout,
                                            written_dtype(out_dtype))
        write(images, mean, rstd, ids_restore.contiguous(), len_keep, patch_size, channel_layout, visible, target)
        return visible.to(out_dtype), target

    @masked_patchify_op.register_fake
    def _(images, ids_restore, len_keep, patch_size, channel_layout, mean, rstd, out_dtype):
        return _patchify_buffers(images, ids_restore.shape[1], len_keep, patch_size, channel_layout, out_dtype)

    def masked_patchify_fused(images, patch_size, masking, layout, stats=None, out_dtype=torch.float32, *,
                              visible=None, target=None):
        channel = layout == "channel"
        mean, rstd = (None, None) if stats is None else stats
        if visible is None and target is None:
            visible, target = masked_patchify_op(images, masking.ids_restore, masking.len_keep, patch_size, channel,
                                                 mean, rstd, out_dtype)
        else:
            visible, target = masked_patchify_outputs(images, patch_size, masking, layout, visible, target,
                                                      written_dtype(out_dtype))
            mean, rstd = float_stats(images, mean, rstd)
            write(images, mean, rstd, masking.ids_restore.contiguous(), masking.len_keep, patch_size, channel,
                  visible, target)
        return MaskedPatches(visible, target, masking)

    _TORCH_OPS[name] = masked_patchify_fused
    return masked_patchify_fused


def _patchify_buffers(images, num_tokens, len_keep, patch_size, channel_layout, visible_dtype=torch.float32):
    """Empty (visible (B, len_keep, P) in `visible_dtype`, target (B, L - len_keep, P) float32) on images' device."""
    B, C = images.shape[:2]
    P = patch_size * patch_size * (1 if channel_layout else C)
    return (images.new_empty((B, len_keep, P), dtype=visible_dtype),
            images.new_empty((B, num_tokens - len_keep, P), dtype=torch.float32))


def check_fused_patchify_input(images: torch.Tensor, masking: Masking) -> None:
    """The fused kernels take uint8/uint16/int32/float16/bfloat16/float32 pixels and int64 permutations."""
    if images.dtype not in (torch.uint8, torch.uint16, torch.int32, torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedInput(f"images of dtype {images.dtype}")
    if images.shape[1] > 16:
        raise UnsupportedInput(f"{images.shape[1]} channels (the kernels take at most 16)")
    if masking.ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {masking.ids_restore.dtype}")


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
    every backend: torch.rand + argsort, as FAIR's MAE), unless `masking` is given. The fused backends then write
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
        return _dispatch("masked_patchify", images.device, impl, images, patch_size, masking, layout, stats,
                         out_dtype)


def standardized_tokens(images: torch.Tensor, patch_size: int, layout: str = "standard",
                        impl: str = "auto") -> torch.Tensor:
    """Raw images -> every token, self-standardised, in order (B, L, P) float32: inference's front end. The fused
    backends of `masked_patchify` with an identity permutation and nothing masked write the tokens in one pass
    after the statistics pass; the reference is standardize + patchify."""
    B, C, H, W = images.shape
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    pixel_scale(images.dtype)
    if _resolve("masked_patchify", images.device, impl)[0] == "reference":  # no identity gather
        _last_impl["masked_patchify"] = "reference"
        return patchify(self_standardize(images), patch_size, layout)
    L = (H // patch_size) * (W // patch_size) * (C if layout == "channel" else 1)
    ids = torch.arange(L, device=images.device).expand(B, L).contiguous()
    identity = Masking(ids, ids, torch.zeros(B, L, device=images.device), L)
    with torch.no_grad():
        return _dispatch("masked_patchify", images.device, impl, images, patch_size, identity, layout, None).visible


# --------------------------------------------------------------------------------------------------------------
# Decoder unshuffle
# --------------------------------------------------------------------------------------------------------------

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
    return _dispatch("unshuffle", x_visible.device, impl, x_visible, mask_token, ids_restore, pos_embed, prefix)


def define_unshuffle_op(backend: str, forward_kernel: Callable, backward_kernel: Callable) -> Callable:
    """The torch op `mae_fast::unshuffle_{backend}(x, mask_token, ids_restore, pos_embed, prefix=0) -> out` (and its
    backward op), with a fake implementation and an autograd formula, so that torch.compile keeps it as one opaque
    node.

    `forward_kernel(x, mask_token, ids_restore, pos_embed, prefix) -> out` gets mask_token (D,) and pos_embed
    (prefix + L, D) already in x's dtype (so both paths round as the reference); `backward_kernel(grad_out,
    ids_restore, grad_x, prefix) -> grad of the mask token (D,) float32` fills grad_x (B, prefix + K, D). The mask
    token's gradient is converted from float32 to its own dtype once (not through x's dtype)."""
    name = f"mae_fast::unshuffle_{backend}"
    if name in _TORCH_OPS:
        return _TORCH_OPS[name]

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
    _TORCH_OPS[name] = unshuffle_op
    return unshuffle_op


def check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed) -> None:
    if x_visible.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedInput(f"x_visible of dtype {x_visible.dtype}")
    if x_visible.stride(-1) != 1:
        raise UnsupportedInput("x_visible without unit stride in the last dimension")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")


# --------------------------------------------------------------------------------------------------------------
# MAE loss: (1 - alpha) * masked MSE + alpha * Fourier loss
# --------------------------------------------------------------------------------------------------------------

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
    return torch.fft.fft2(planes.to(_compute_dtype(tokens))).abs()


@register("mae_loss", "reference")
def _mae_loss_reference(pred, target, mask, patch_size, layout, alpha):
    dtype = _compute_dtype(pred)
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
    if name in _TORCH_OPS:
        return _TORCH_OPS[name]

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
    _TORCH_OPS[name] = mae_loss_op
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
    return _dispatch("mae_loss", pred.device, impl, pred, target, mask, patch_size, layout, float(alpha))


# --------------------------------------------------------------------------------------------------------------
# Lion update (Chen et al. 2023), decoupled weight decay
# --------------------------------------------------------------------------------------------------------------

@register("lion_update", "reference")
@torch.no_grad()
def _lion_update_reference(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
    """One tensor at a time, in float32: p <- p*(1-lr*wd) - lr*sign(b1*m + (1-b1)*g); m <- b2*m + (1-b2)*g."""
    for p, g, m in zip(params, grads, exp_avgs):
        g32, m32 = g.float(), m.float()
        update = (m32 * beta1 + g32 * (1 - beta1)).sign_()
        p32 = p.float().mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        p.copy_(p32)
        m.copy_(m32.mul_(beta2).add_(g32, alpha=1 - beta2))


@register("lion_update", "foreach")
@torch.no_grad()
def _lion_update_foreach(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
    """The same arithmetic as the reference with torch._foreach ops (float32 tensors; others go one by one)."""
    fp32 = [i for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs))
            if p.dtype == g.dtype == m.dtype == torch.float32]
    rest = sorted(set(range(len(params))) - set(fp32))
    if fp32:
        ps = [params[i] for i in fp32]
        gs = [grads[i] for i in fp32]
        ms = [exp_avgs[i] for i in fp32]
        update = torch._foreach_mul(ms, beta1)
        torch._foreach_add_(update, gs, alpha=1 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_add_(ps, update, alpha=-lr)
        torch._foreach_mul_(ms, beta2)
        torch._foreach_add_(ms, gs, alpha=1 - beta2)
    if rest:
        _lion_update_reference([params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
                               lr, beta1, beta2, weight_decay)


LION_DTYPES = (torch.float32, torch.bfloat16)


def lion_fusable(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> bool:
    """Whether the fused Lion kernels take this (param, grad, exp_avg) triple: one device, contiguous, same
    shape, float32/bfloat16 storage. Others are updated by the reference, one tensor at a time."""
    return (
        p.dtype in LION_DTYPES and g.dtype in LION_DTYPES and m.dtype in LION_DTYPES
        and p.shape == g.shape == m.shape
        and p.device == g.device == m.device
        and p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
        and not g.is_sparse
    )


@dataclass(frozen=True)
class LionScalars:
    """The float32 scalars of one Lion step, rounded exactly as the reference's tensor-scalar ops round them."""

    lr: float
    decay: float            # 1 - lr * wd
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float

    @classmethod
    def make(cls, lr: float, beta1: float, beta2: float, weight_decay: float) -> "LionScalars":
        return cls(lr, 1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2)


def lion_groups(params, grads, exp_avgs) -> tuple[dict[tuple, tuple[list, list, list]], list[int]]:
    """Split a Lion call into one group per (param, grad, exp_avg) dtype combination of fusable tensors (one kernel
    launch each) and the indices of the rest (updated by the reference)."""
    groups: dict[tuple, tuple[list, list, list]] = {}
    rest = []
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        if not lion_fusable(p, g, m):
            rest.append(i)
            continue
        ps, gs, ms = groups.setdefault((p.dtype, g.dtype, m.dtype), ([], [], []))
        ps.append(p)
        gs.append(g)
        ms.append(m)
    return groups, rest


def lion_update_rest(rest, params, grads, exp_avgs, lr, beta1, beta2, weight_decay) -> None:
    """The reference update of the tensors no fused kernel takes (see `lion_fusable`)."""
    if rest:
        _lion_update_reference([params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
                               lr, beta1, beta2, weight_decay)


def lion_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
    lr: float, beta1: float = 0.9, beta2: float = 0.95, weight_decay: float = 0.0, impl: str = "auto",
) -> None:
    """In-place Lion step over lists of tensors (all on one device). The fused backends launch one kernel per
    (param, grad, exp_avg) dtype combination; the hyperparameters are runtime arguments."""
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    if not params:
        return
    args = (list(params), list(grads), list(exp_avgs), float(lr), float(beta1), float(beta2), float(weight_decay))
    if impl == "foreach":
        _REGISTRY["lion_update"]["foreach"](*args)
        _last_impl["lion_update"] = "foreach"
        return
    _dispatch("lion_update", params[0].device, impl, *args)
