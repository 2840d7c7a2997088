"""What the per-op kernel tests share: the implementations compared with the reference, the device each runs on,
one tolerance table.

"cpp": the C++ CPU kernels (skipped when the extension is not built). "triton": the Triton kernels, on the GPU when
CUDA is present, else in Triton's CPU interpreter (the repo conftest sets TRITON_INTERPRET=1; about a second per
million elements, hence their smaller shapes; the test runs inside `ops.use_impl("triton")`, see conftest.py); marked
`triton`, so benchmarks/gpu.sh selects them with -m "gpu or triton". Kernel-level calls go through the op module's
kernel table (`KERNELS[impl]`), one signature per op.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mae_fast import ops
from mae_fast.ops.unshuffle import REGISTERED


def triton_ready() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from mae_fast.kernels._common import interpreting

    return (torch.cuda.is_available() or interpreting()) and "triton" in ops.available_impls("unshuffle")


CPP = pytest.param("cpp", marks=pytest.mark.skipif(
    "cpp" not in ops.available_impls("unshuffle"), reason="C++ extension not built (python setup.py build_ext --inplace)"))
TRITON = pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
    not triton_ready(), reason="Triton needs CUDA or TRITON_INTERPRET=1")])
IMPLS = [CPP, TRITON]


def impl_cases(table: dict[str, list]) -> list:
    """pytest params (impl, *case) from {impl: [case tuple, ...]}, with the impl's marks."""
    marks = {"cpp": CPP.marks, "triton": TRITON.marks}
    return [pytest.param(impl, *case, marks=marks[impl], id=f"{impl}-" + "-".join(map(str, case)))
            for impl, cases in table.items() for case in cases]


def device(impl: str) -> torch.device:
    return torch.device("cuda" if impl == "triton" and torch.cuda.is_available() else "cpu")


def runs_by_default(impl: str) -> bool:
    """Whether `impl` is what the default dispatch picks for its tensors (C++ on the CPU, Triton on CUDA)."""
    return REGISTERED["unshuffle"].get(device(impl).type) == impl


def gen(seed: int, dev: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(dev).manual_seed(seed)


def nan(shape, dtype=torch.float32, dev="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=dev)


# (rtol, atol as a fraction of the reference's largest magnitude) per dtype of the compared tensor
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 8e-3), torch.float16: (2e-3, 1e-3)}
PATCHIFY_TOL = (2e-6, 2e-6)  # standardised pixels: float32 rounding of a few operations


def close(got, expected, dtype=None, tol=None):
    dtype = dtype or got.dtype
    got, expected = got.detach(), expected.detach()
    rtol, atol = tol or TOL[dtype]
    assert torch.isfinite(got).all(), "output not fully written (NaN poison survived) or non-finite"
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), rtol=rtol,
                               atol=atol * float(expected.float().abs().max()))
