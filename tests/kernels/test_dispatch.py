"""The choice of implementation is PyTorch's dispatch by device: the C++ kernels are registered for CPU tensors (and a
torch op called directly, with no mae_fast function around it, runs them), `use_impl` / MAE_FAST_IMPL override the
registration and restore it afterwards, a kernel that refuses an input runs the op's default body (counted), and
`use_impl("triton")` runs the Triton kernels on CPU tensors in the interpreter, forward and backward ops."""
from __future__ import annotations

import importlib

import pytest
import torch

from mae_fast import ops
from mae_fast.ops import implementation
from tests.kernels.cases import CPP, TRITON, device, gen

def _loss_op(dtype=torch.float32, dev="cpu"):
    """A direct call of the torch op (no public function): what runs is the dispatcher's choice alone."""
    pred = torch.randn(2, 3, 64, generator=gen(1)).to(dtype).to(dev)
    return torch.ops.mae_fast.mae_loss(pred, pred + 1, None, 8, 0.1)


def _train_step_ops(dev, dtype=torch.float32):
    """Every fused op once through its public function, with the backward ops (the decoder's path)."""
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=gen(2), dtype=torch.uint8).to(dev)
    patches = ops.masked_patchify(images, 8, 0.5, generator=gen(3, dev))
    x = patches.visible.to(dtype).requires_grad_()
    token = torch.randn(x.shape[-1], generator=gen(4), dtype=dtype).to(dev).requires_grad_()
    full = ops.unshuffle(x, token, patches.masking.ids_restore)
    loss = ops.masked_mae_loss(full, patches.target.to(dtype), patches.masking, patch_size=8, alpha=0.1)
    loss.backward()
    params, grads, moms = [torch.randn(5, device=dev)], [torch.randn(5, device=dev)], [torch.zeros(5, device=dev)]
    ops.lion_update(params, grads, moms, lr=1e-3)


PUBLIC_OPS = ("masked_patchify", "unshuffle", "masked_mae_loss", "lion_update")
STEP_OPS = PUBLIC_OPS + ("unshuffle_backward",)  # the ops a step dispatches (masked_mae_loss_backward aside)


@pytest.mark.parametrize("impl", [CPP])
def test_cpu_tensors_run_the_cpp_kernels_by_default(impl, monkeypatch):
    monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    for module in ("masked_patchify", "unshuffle", "mae_loss", "lion"):
        for op, devices in importlib.import_module(f"mae_fast.ops.{module}").REGISTERED.items():
            assert devices.get("cpu") == ("cpp" if op != "masked_mae_loss_backward" else None), (op, devices)
    _train_step_ops(device(impl))
    assert {op: ops.last_impl(op) for op in STEP_OPS} == dict.fromkeys(STEP_OPS, "cpp")
    assert ops.last_impl("masked_mae_loss_backward") == "reference"  # no C++ scatter: the op's default body
    _loss_op()
    assert ops.last_impl("mae_loss") == "cpp"


@pytest.mark.parametrize("impl", [CPP])
def test_use_impl_reference_runs_the_references_and_restores_the_kernels(impl, monkeypatch):
    monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    with ops.use_impl("reference"):
        _train_step_ops(device(impl))
        # the public functions: the plain-PyTorch references (autograd through them: no backward op)
        assert {op: ops.last_impl(op) for op in PUBLIC_OPS} == dict.fromkeys(PUBLIC_OPS, "reference")
        _loss_op()
        assert ops.last_impl("mae_loss") == "reference"  # a torch op called directly: its default body
        with ops.use_impl("cpp"):  # blocks nest
            _loss_op()
            assert ops.last_impl("mae_loss") == "cpp"
        _loss_op()
        assert ops.last_impl("mae_loss") == "reference"
    _loss_op()
    assert ops.last_impl("mae_loss") == "cpp"  # the registration by device is back
    with pytest.raises(ValueError, match="use_impl's name must be one of"):
        with ops.use_impl("fastest"):
            pass


@pytest.mark.parametrize("impl", [CPP])
def test_environment_variable_reference_and_back(impl, monkeypatch):
    x = torch.randn(2, 3, 64)
    monkeypatch.setenv("MAE_FAST_IMPL", "reference")
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "reference"
    _loss_op()
    assert ops.last_impl("mae_loss") == "reference"  # the variable, read by the public call, reaches the torch op
    monkeypatch.delenv("MAE_FAST_IMPL")
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "cpp"
    _loss_op()
    assert ops.last_impl("mae_loss") == "cpp"


@pytest.mark.parametrize("impl", [CPP])
def test_a_refused_input_runs_the_default_body_and_is_counted(impl, monkeypatch):
    monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    before = ops.fallbacks["mae_loss"]
    loss, grad = _loss_op(torch.float64)  # float64: no C++ instance
    assert ops.last_impl("mae_loss") == "reference" and ops.fallbacks["mae_loss"] == before + 1
    assert loss.dtype == torch.float32 and grad.dtype == torch.float64
    torch.testing.assert_close(loss, _loss_op()[0].to(loss.dtype), rtol=1e-5, atol=0)
    before = ops.fallbacks["unshuffle_backward"]
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = torch.ops.mae_fast.unshuffle(x, torch.zeros(8, dtype=torch.float64), torch.arange(5).expand(2, 5), None)
    out.sum().backward()
    assert ops.last_impl("unshuffle") == "reference" and ops.last_impl("unshuffle_backward") == "reference"
    assert ops.fallbacks["unshuffle_backward"] == before + 1
    with ops.use_impl("cpp"), pytest.raises(RuntimeError, match="cannot take these inputs: pred of dtype"):
        _loss_op(torch.float64)  # asked for by name: no silent fallback


@pytest.mark.parametrize("impl", [TRITON])
def test_use_impl_triton_runs_the_triton_kernels_on_cpu_tensors(impl, monkeypatch):
    """Forward and backward ops, under the interpreter (the conftest's block is undone first, to start from the
    registration by device); after the block the C++ kernels are registered again."""
    if torch.cuda.is_available():
        pytest.skip("CPU tensors in Triton's interpreter (on a CUDA machine tests/gpu covers the kernels)")
    monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    with ops.use_impl("auto"):
        _loss_op()
        assert ops.last_impl("mae_loss") == ("cpp" if "cpp" in ops.available_impls("mae_loss") else "reference")
        with ops.use_impl("triton"):
            _train_step_ops("cpu")
            assert {op: ops.last_impl(op) for op in STEP_OPS} == dict.fromkeys(STEP_OPS, "triton")
            assert ops.last_impl("masked_mae_loss_backward") == "triton"
            with pytest.raises(RuntimeError, match="cannot take these inputs"):
                _loss_op(torch.float64)
        _loss_op()
        assert ops.last_impl("mae_loss") == ("cpp" if "cpp" in ops.available_impls("mae_loss") else "reference")
        assert implementation._active == "auto"


@pytest.mark.parametrize("impl", [CPP])
def test_the_variable_is_read_when_a_first_call_is_traced(impl, monkeypatch):
    """MAE_FAST_IMPL set before any eager call: the compiled call applies it when traced, in one graph."""
    import torch._dynamo

    x = torch.randn(2, 3, 64)
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "cpp"
    monkeypatch.setenv("MAE_FAST_IMPL", "reference")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda a: ops.mae_loss(a, a + 1, patch_size=8, layout="channel"), backend="eager",
                                 fullgraph=True)
        compiled(x)
        assert ops.last_impl("mae_loss") == "reference" and implementation._active == "reference"
    finally:
        torch._dynamo.reset()
        monkeypatch.delenv("MAE_FAST_IMPL")
        ops.mae_loss(x, x + 1, patch_size=8, layout="channel")  # an eager call reads the variable again
    assert ops.last_impl("mae_loss") == "cpp"
