"""The fused ops of mae_fast: one public function per op, one dispatcher.

Each op exists in up to three forms under one name: the plain-PyTorch reference below (the oracle and the last
fallback), a Triton kernel for CUDA tensors (`mae_fast.kernels.<op>`) and a C++ kernel for CPU tensors
(`mae_fast._C`, when the extension is built). `choose_impl` picks one; `impl="reference"` (or the environment
variable MAE_FAST_IMPL=reference) forces the reference for debugging.

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


def register(op: str, backend: str):
    """Decorator: register `fn` as `backend` ("reference", "triton" or "cpp") of `op`."""

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _load_fast_backends() -> None:
    """Import the optional kernel modules once; each registers itself. Missing ones are simply absent."""
    if getattr(_load_fast_backends, "done", False):
        return
    _load_fast_backends.done = True
    try:
        from mae_fast import kernels  # noqa: F401  (registers Triton ops where Triton is importable)

        register_all = getattr(kernels, "register_all", None)
        if register_all is not None:
            register_all(register)
    except ImportError:
        pass
    try:
        from mae_fast import _C  # noqa: F401

        from mae_fast import cpu_ops

        cpu_ops.register_all(register)
    except ImportError:
        pass


def available_impls(op: str) -> list[str]:
    _load_fast_backends()
    return sorted(_REGISTRY.get(op, {}))


def choose_impl(op: str, device: torch.device, impl: str = "auto") -> Callable:
    """The implementation of `op` for tensors on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _load_fast_backends()
    backends = _REGISTRY[op]
    if impl == "auto":
        impl = os.environ.get("MAE_FAST_IMPL", "auto")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpp"
        if impl not in backends:
            impl = "reference"
    if impl not in backends:
        raise RuntimeError(f"op {op!r} has no {impl!r} implementation here (available: {sorted(backends)})")
    _last_impl[op] = impl
    return backends[impl]


def last_impl(op: str) -> str | None:
    """Which implementation the last call of `op` used (for tests and benchmark reports)."""
    return _last_impl.get(op)


# --------------------------------------------------------------------------------------------------------------
# Input scaling and self-standardisation
# --------------------------------------------------------------------------------------------------------------

def to_unit_float(images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """uint8 / 255, uint16 / 65535 (as float32); float input must already lie in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype == torch.uint16:
        return images.to(torch.int32).float() / 65535.0
    if images.dtype == torch.int32:  # uint16 images loaded through numpy/PIL paths arrive widened
        return images.float() / 65535.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8, uint16 or float in [0, 1], got dtype {images.dtype}")
    if check_range:
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must be intensities scaled to [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
                "pass the raw uint8/uint16 pixels instead"
            )
    return images.float()


def standardize(x: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Per-image per-channel standardisation over H x W (instance norm without affine). x: (B, C, H, W)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def channel_stats(x: torch.Tensor, eps: float = STANDARDIZE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel (mean, rstd) of a float image batch: both (B, C)."""
    mean = x.mean(dim=(2, 3))
    var = x.var(dim=(2, 3), unbiased=False)
    return mean, torch.rsqrt(var + eps)


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


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, P), ids (B, K) -> (B, K, P)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class MaskedPatches:
    visible: torch.Tensor   # (B, len_keep, P) standardised visible tokens, in shuffled order
    target: torch.Tensor    # (B, L - len_keep, P) standardised masked tokens, in shuffled order (the loss target)
    masking: Masking


@register("masked_patchify", "reference")
def _masked_patchify_reference(images, patch_size, masking, layout):
    x = standardize(to_unit_float(images, check_range=False))
    tokens = patchify(x, patch_size, layout)
    return MaskedPatches(gather_tokens(tokens, masking.ids_keep), gather_tokens(tokens, masking.ids_masked), masking)


def masked_patchify(
    images: torch.Tensor,
    patch_size: int,
    mask_ratio: float,
    layout: str = "standard",
    generator: torch.Generator | None = None,
    masking: Masking | None = None,
    impl: str = "auto",
) -> MaskedPatches:
    """Raw images (B, C, H, W; uint8/uint16/float in [0,1]) -> self-standardised visible tokens + masked targets.

    The random permutation is drawn here (reproducible through `generator`) unless `masking` is given.
    """
    B, C, H, W = images.shape
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    L = (H // patch_size) * (W // patch_size) * (C if layout == "channel" else 1)
    if masking is None:
        masking = random_masking(B, L, mask_ratio, images.device, generator)
    elif masking.ids_shuffle.shape != (B, L):
        raise ValueError(f"masking covers {tuple(masking.ids_shuffle.shape)} tokens, images give {(B, L)}")
    with torch.no_grad():  # images are data: no gradient flows into them
        return choose_impl("masked_patchify", images.device, impl)(images, patch_size, masking, layout)


# --------------------------------------------------------------------------------------------------------------
# Decoder unshuffle
# --------------------------------------------------------------------------------------------------------------

@register("unshuffle", "reference")
def _unshuffle_reference(x_visible, mask_token, ids_restore, pos_embed):
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    x = torch.cat([x_visible, mask_token.reshape(1, 1, D).expand(B, L - K, D).to(x_visible.dtype)], dim=1)
    x = gather_tokens(x, ids_restore)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, L, D).to(x.dtype)
    return x


def unshuffle(
    x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None, impl: str = "auto",
) -> torch.Tensor:
    """Visible tokens (B, K, D) in shuffled order + mask token (D,) -> (B, L, D) in original order (+ pos (L, D))."""
    return choose_impl("unshuffle", x_visible.device, impl)(x_visible, mask_token, ids_restore, pos_embed)


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
    return torch.fft.fft2(patch_planes(tokens, patch_size, layout).float()).abs()


@register("mae_loss", "reference")
def _mae_loss_reference(pred, target, mask, patch_size, layout, alpha):
    mse = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    fourier = (fourier_magnitude(pred, patch_size, layout) - fourier_magnitude(target, patch_size, layout)).abs()
    fourier = fourier.flatten(2).mean(dim=-1)  # (B, N): mean over channels and frequencies
    per_token = (1 - alpha) * mse + alpha * fourier
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
    patch_size: int, layout: str = "standard", alpha: float = 0.01, impl: str = "auto",
) -> torch.Tensor:
    """Per-token reconstruction loss averaged over the tokens where `mask` is 1 (all tokens if mask is None).

    pred, target: (B, N, P) in `layout`. Per token: (1-alpha) * mean squared error over its pixels
    + alpha * mean over channels and frequencies of | |FFT2(pred plane)| - |FFT2(target plane)| |.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    P = pred.shape[-1]
    if P % (patch_size * patch_size):
        raise ValueError(f"token size {P} is not a multiple of patch_size^2 = {patch_size**2}")
    if layout == "channel" and P != patch_size * patch_size:
        raise ValueError(f"channel-layout tokens hold p*p = {patch_size**2} values, got {P}")
    return choose_impl("mae_loss", pred.device, impl)(pred, target, mask, patch_size, layout, alpha)


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


def lion_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
    lr: float, beta1: float = 0.9, beta2: float = 0.95, weight_decay: float = 0.0, impl: str = "auto",
) -> None:
    """In-place Lion step over lists of tensors (all on one device)."""
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    if not params:
        return
    if impl == "foreach":
        fn = _REGISTRY["lion_update"]["foreach"]
        _last_impl["lion_update"] = "foreach"
    else:
        fn = choose_impl("lion_update", params[0].device, impl)
    fn(params, grads, exp_avgs, float(lr), float(beta1), float(beta2), float(weight_decay))
