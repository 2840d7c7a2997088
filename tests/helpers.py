"""What the test suites share: the repository root, tolerance tables and comparisons of the kernel suites (CPU,
Triton interpreter, GPU), and fixtures' builders (OpenPhenom-layout states, killed runs, images with a given spread)."""
from __future__ import annotations

import importlib.util
import os
import socket
from types import ModuleType

import torch

from mae_fast import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def load_benchmark_script(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) loaded as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# (rtol, atol as a fraction of max |reference|, relative L2 error) of loss gradients per kind of arithmetic
LOSS_GRAD_TOL = {"float32": (1e-4, 1e-5, 1e-4), "tf32": (1e-3, 1e-4, 5e-3), "bfloat16": (1.6e-2, 8e-3, 5e-3),
                 "float16": (2e-3, 1e-3, 1e-3),
                 # exact spectra, bf16 operands in the gradient's adjoint products (the fused loss on a GPU:
                 # kernels/mae_loss.py default_precisions): 2.3e-3 relative L2 measured at p = 16, alpha = 0.3
                 "bf16_adjoint": (1e-2, 5e-3, 5e-3)}


def assert_loss_grad_close(got, ref, *, kind, alpha, p, planes, weight_max, scale=1.0):
    """Loss gradients. sign(|Fx| - |Fy|) is ill-conditioned where the two magnitudes (nearly) tie: either sign is a
    valid subgradient and rounding may pick the other. A flip at frequency f (and its conjugate mirror, which ties
    with it) moves that plane's gradient by at most 4 w alpha / (C' p^2) per element. So: elementwise within
    (rtol, atol) plus two such pair flips, and a relative L2 error below the kind's bound (flips are sparse; a wrong
    Fourier or MSE term is not)."""
    rtol, atol, norm_tol = LOSS_GRAD_TOL[kind]
    got, ref = got.detach().float(), ref.detach().float()
    assert torch.isfinite(got).all(), "gradient not fully written (NaN poison survived) or non-finite"
    pair_flip = 4 * scale * weight_max * alpha / (planes * p * p)
    excess = (got - ref).abs() - (atol * ref.abs().max() + rtol * ref.abs() + 2 * pair_flip)
    assert excess.max() <= 0, f"max excess {excess.max().item():.3g} over the tolerance"
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= norm_tol, f"relative L2 error {rel:.3g} > {norm_tol}"


def openphenom_layout_state(model) -> dict:
    """A CA-MAE's weights re-keyed exactly like a released OpenPhenom checkpoint (timm names under
    `encoder.vit_backbone`, mask token (1, 1, D), fixed positions and the class-token placeholder stored), written
    independently of `mae_fast.interop.load_openphenom` so that tests of the importer do not check it against
    itself."""
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            state["encoder.vit_backbone." + k[len("encoder."):]] = v.clone()
        elif k == "decoder.mask_token":
            state[k] = v.reshape(1, 1, -1).clone()
        else:
            state[k] = v.clone()
    state["encoder.vit_backbone.pos_embed"] = model.encoder.pos_embed.clone()
    state["decoder.placeholder"] = torch.zeros(1, 1, model.cfg.decoder_dim)
    return state


def run_as_if_killed_after(run_dir: str, copy_to, step: int) -> str:
    """A copy of a finished training run with everything after the checkpoint of `step` removed."""
    import os
    import shutil

    from mae_fast.training.checkpointing import list_checkpoints

    shutil.copytree(run_dir, copy_to)
    for s, path in list_checkpoints(str(copy_to)):
        if s > step:
            shutil.rmtree(path)
    shutil.rmtree(os.path.join(copy_to, "model"))
    return str(copy_to)


def images_with_spread(B: int, C: int, H: int, mean: float, std: float, dtype=torch.uint16, seed: int = 0):
    """Integer images (B, C, H, H) of `dtype` whose every channel is Gaussian noise of `std` raw counts around
    `mean` counts (rounded, clipped to the dtype's range): a dim channel at a given brightness."""
    top = 255 if dtype == torch.uint8 else 65535
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, H, generator=g, dtype=torch.float64) * std + mean).round().clamp(0, top)
    return x.to(torch.int32).to(dtype)


def standardised_planes(patches, patch_size: int, channels: int, layout: str) -> torch.Tensor:
    """The (B, C, H, W) image a masked patchify's visible + target tokens hold (undoing the shuffle)."""
    shuffled = torch.cat([patches.visible, patches.target], dim=1)
    return ops.unpatchify(ops.gather_tokens(shuffled, patches.masking.ids_restore), patch_size, channels, layout)


def assert_unit_std(planes: torch.Tensor, tol: float = 1e-3) -> None:
    """Every (image, channel) plane has mean 0 and std 1 within `tol`."""
    planes = planes.detach().double().cpu()
    assert torch.isfinite(planes).all(), "output not fully written (NaN poison survived) or non-finite"
    std, mean = planes.std(dim=(2, 3), unbiased=False), planes.mean(dim=(2, 3))
    assert (std - 1).abs().max() <= tol, f"std {std.min().item():.6f}..{std.max().item():.6f}, not 1 within {tol}"
    assert mean.abs().max() <= tol, f"mean up to {mean.abs().max().item():.3g}, not 0 within {tol}"


def truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by dropping the low 16 bits (round toward zero): what the Triton interpreter's conversion
    does (a GPU and torch round to nearest)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def unshuffle_expected(x, token, ids, pos, grad_out, prefix, out_dtype=None, to_dtype=None) -> dict:
    """What a fused unshuffle must give, bitwise where it can: the reference's arithmetic with every rounding to a
    narrower dtype done by `to_dtype(float32 tensor, dtype)` (default: torch's round to nearest, which makes `out` and
    `grad_x` the reference's own -- asserted here -- so a backend that rounds otherwise, the Triton interpreter,
    passes its own rounding). out: a token rounded to the output dtype, + pos summed in float32, rounded once;
    grad_x: grad_out's values converted to x's dtype. grad_token and grad_pos are float64 sums (compare with a
    tolerance: the kernels sum in float32 in their own order)."""
    from mae_fast.ops.unshuffle import unshuffle_out_dtype

    out_dtype = unshuffle_out_dtype(x, token, pos, out_dtype)
    rn = to_dtype is None
    to_dtype = to_dtype or (lambda t, dtype: t.to(dtype))
    x, token, pos = (None if t is None else t.detach() for t in (x, token, pos))
    # a token rounded to the output dtype first (exact unless narrower), then the float32 sum, rounded once
    x_out = to_dtype(x.float(), out_dtype).float()
    sum32 = ops.unshuffle(x_out, token.to(out_dtype).float(), ids, None if pos is None else pos.to(out_dtype).float(),
                          impl="reference", prefix=prefix)
    out = to_dtype(sum32, out_dtype)
    # the gradient wrt the converted tokens is grad_out gathered (no arithmetic), then converted to x's dtype
    leaf = x.to(out_dtype).requires_grad_()
    (grad_gathered,) = torch.autograd.grad(
        ops.unshuffle(leaf, token.to(out_dtype), ids, pos, impl="reference", prefix=prefix, out_dtype=out_dtype),
        leaf, grad_out)
    grad_x = to_dtype(grad_gathered.float(), x.dtype)
    if rn:
        ref = ops.unshuffle(x.requires_grad_(), token, ids, pos, impl="reference", prefix=prefix, out_dtype=out_dtype)
        assert torch.equal(out, ref.detach()), "expected forward is not the reference's"
        assert torch.equal(grad_x, torch.autograd.grad(ref, x, grad_out)[0]), "expected grad_x is not the reference's"
    token64 = token.double().requires_grad_()
    pos64 = None if pos is None else pos.double().requires_grad_()
    out64 = ops.unshuffle(x.double(), token64, ids, pos64, impl="reference", prefix=prefix)
    grads = torch.autograd.grad(out64, [t for t in (token64, pos64) if t is not None], grad_out.double())
    return {"out": out, "grad_x": grad_x, "grad_token": grads[0], "grad_pos": grads[1] if pos is not None else None,
            "out_dtype": out_dtype}


def ops_making(shape, fn):
    """fn()'s result, and the names of the dispatched ops (aten or custom, not looking inside a custom op) that
    returned a tensor of `shape` while it ran -- e.g. to find a conversion pass autograd would add."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) for t in tree_leaves(out)):
                self.names.append(str(func))
            return out

    with OpLog() as log:
        result = fn()
    return result, log.names


# The unshuffle tests' dtype cases (C++ and Triton): (x dtype, mask token and pos dtype, out_dtype argument) --
# promoted outputs (the model under autocast: bf16 tokens and float32 parameters -> float32, as torch.cat + add),
# one dtype throughout, and overrides narrower than x
UNSHUFFLE_DTYPES = [
    (torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, None), (torch.float16, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None), (torch.float16, torch.float16, None),
    (torch.float32, torch.float32, torch.bfloat16), (torch.float16, torch.float32, torch.bfloat16),
]
_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", None: "auto"}
UNSHUFFLE_IDS = [f"x{_SHORT[x]}-p{_SHORT[p]}-out{_SHORT[o]}" for x, p, o in UNSHUFFLE_DTYPES]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
