"""The "triton" cases on CPU tensors (Triton's interpreter, no CUDA) run inside `ops.use_impl("triton")`: PyTorch's
dispatcher gives CPU tensors the C++ kernels, and a backward op runs after the call that named its kernel returns,
so the override covers the whole test (forward and backward ops). On a CUDA machine the dispatcher picks the Triton
kernels for CUDA tensors itself."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from tests.kernels.cases import triton_ready


@pytest.fixture(autouse=True)
def _triton_on_cpu_tensors(request):
    callspec = getattr(request.node, "callspec", None)
    named = callspec is not None and callspec.params.get("impl") == "triton"
    if not named or torch.cuda.is_available() or not triton_ready():
        yield
        return
    with ops.use_impl("triton"):
        yield
