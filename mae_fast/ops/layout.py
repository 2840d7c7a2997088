"""What every op shares: pixel scaling, self-standardisation, token layouts and random masking.

Token layouts:
    "standard": (B, L, p*p*C), tokens (h, w) row-major, pixels within a token ordered (p, q, c)
    "channel":  (B, C*L, p*p), channel-major (all patches of channel 0, then channel 1, ...), pixels (p, q)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYOUTS = ("standard", "channel")
STANDARDIZE_EPS = 1e-5


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    out = compute_dtype(x)
    return mean.to(out), torch.rsqrt(var + eps).to(out)


def standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-image per-channel standardisation over H x W of a [0, 1]-scaled batch (B, C, H, W); `eps`:
    `standardize_eps(raw dtype)`. This is the op OpenPhenom's input norm runs (InstanceNorm2d without affine), so
    uint8 input gives OpenPhenom's bits; its statistics are single-pass Welford / two-pass sums, not
    E[x^2] - E[x]^2, so a dim 16-bit channel on a bright background keeps its variance (tests/unit/test_ops_reference.py)."""
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
    """tokens (B, L, P), ids (B, K) -> (B, K, P): row ids[b, k] of sample b.

    One whole-row copy per token (index_select on the flattened rows): torch.gather with the index expanded over P
    indexes element by element, 20-30x slower on a CPU at the MAE loss's (16, 256, 1536) in bf16 (measured)."""
    B, L, P = tokens.shape
    rows = ids.long() + torch.arange(B, device=ids.device).unsqueeze(1) * L
    return tokens.reshape(B * L, P).index_select(0, rows.reshape(-1)).view(B, ids.shape[1], P)

