"""The unshuffle kernels (C++: csrc/unshuffle.cpp; Triton: kernels/unshuffle.py) against the reference, forward and
backward: out and grad_x bitwise (one rounding each, as the reference; in Triton's interpreter the reference's
arithmetic with its truncating bfloat16 conversion), outputs poisoned with NaN, odd shapes (D = 40, L = 13)."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from mae_fast.ops.unshuffle import KERNELS
from tests.helpers import UNSHUFFLE_DTYPES, UNSHUFFLE_IDS, ops_making, truncate_to_bf16, unshuffle_expected
from tests.kernels.cases import CPP, IMPLS, close, device, gen, nan, runs_by_default


def _interpreting(impl: str) -> bool:
    if impl != "triton":
        return False
    from mae_fast.kernels._common import interpreting

    return interpreting()


def _to_as_the_kernels(t, dtype):
    """float32 -> dtype as the interpreted Triton kernels round it: toward zero to bfloat16 (a GPU rounds to nearest,
    as torch)."""
    return truncate_to_bf16(t) if dtype == torch.bfloat16 else t.to(dtype)


def _coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _unshuffle_inputs(B, K, L, D, prefix, x_dtype, param_dtype, with_pos, seed, dev="cpu"):
    g = gen(seed)
    x = torch.randn(B, 1 + prefix + K, D, generator=g).to(x_dtype).to(dev)[:, 1:]  # a strided view, as CA-MAE passes it
    token = torch.randn(D, generator=g).to(param_dtype).to(dev)
    pos = torch.randn(prefix + L, D, generator=g).to(param_dtype).to(dev) if with_pos else None
    ids = torch.argsort(torch.rand(B, L, generator=g), dim=1).to(dev)
    return x, token, ids, pos


def _check_unshuffle(impl, B, K, L, D, prefix, dtypes, with_pos, seed):
    """Kernel level on NaN-poisoned outputs, then through the op and autograd: out and grad_x bitwise, grad_x in x's
    dtype, the mask token's and pos's gradients in their dtypes. More row tiles than Triton's backward programs, so
    a program sums several tiles."""
    dev = device(impl)
    x_dtype, param_dtype, out_arg = dtypes
    x, token, ids, pos = _unshuffle_inputs(B, K, L, D, prefix, x_dtype, param_dtype, with_pos, seed, dev)
    out_dtype = out_arg or torch.promote_types(x_dtype, param_dtype)
    grad_out = torch.randn(B, prefix + L, D, generator=gen(seed + 1)).to(out_dtype).to(dev)
    exp = unshuffle_expected(x, token, ids, pos, grad_out, prefix, out_arg,
                             to_dtype=_to_as_the_kernels if _interpreting(impl) else None)
    assert exp["out_dtype"] == out_dtype

    forward, backward = KERNELS[impl]
    out = forward(x, token.to(out_dtype), ids, None if pos is None else pos.to(out_dtype), prefix,
                  out=nan((B, prefix + L, D), out_dtype, dev))
    assert torch.isfinite(out).all() and torch.equal(out, exp["out"]), "forward must round exactly as the reference"
    grad_x = nan((B, prefix + K, D), x_dtype, dev)
    grad_token = backward(grad_out, ids, grad_x, prefix)
    assert torch.isfinite(grad_x).all() and torch.equal(grad_x, exp["grad_x"])
    close(grad_token, exp["grad_token"], dtype=torch.float32)

    leaves = [t.detach().clone().requires_grad_() for t in (x, token, pos) if t is not None]
    fused = ops.unshuffle(*leaves[:2], ids, leaves[2] if with_pos else None, prefix=prefix, out_dtype=out_arg,
                          impl="auto" if runs_by_default(impl) else impl)
    assert ops.last_impl("unshuffle") == impl and fused.dtype == out_dtype
    assert torch.equal(fused, exp["out"])
    # grad_x comes out of the backward op in x's dtype: no conversion pass of its size left to autograd
    grads, full_size = ops_making(grad_x.shape, lambda: torch.autograd.grad(fused, leaves, grad_out))
    assert full_size == ["mae_fast.unshuffle_backward.default"], full_size
    assert grads[0].dtype == x_dtype and torch.equal(grads[0], exp["grad_x"])
    assert grads[1].dtype == param_dtype
    close(grads[1], exp["grad_token"], dtype=param_dtype)
    if with_pos:  # grad_out summed over images in the output dtype, then converted to pos's
        assert grads[2].dtype == param_dtype
        close(grads[2], exp["grad_pos"], dtype=_coarser(param_dtype, out_dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", UNSHUFFLE_DTYPES, ids=UNSHUFFLE_IDS)
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_unshuffle_dtypes_and_prefix(impl, dtypes, prefix, with_pos):
    _check_unshuffle(impl, 5, 5, 13, 40, prefix, dtypes, with_pos, seed=9)  # odd shapes: D = 40, L = 13


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", [UNSHUFFLE_DTYPES[1], UNSHUFFLE_DTYPES[3]], ids=[UNSHUFFLE_IDS[1], UNSHUFFLE_IDS[3]])
@pytest.mark.parametrize("prefix", [0, 1])
def test_unshuffle_without_positions(impl, dtypes, prefix):
    _check_unshuffle(impl, 3, 4, 11, 24, prefix, dtypes, False, seed=30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", [UNSHUFFLE_DTYPES[i] for i in (1, 3, 6)], ids=[UNSHUFFLE_IDS[i] for i in (1, 3, 6)])
@pytest.mark.parametrize("prefix", [1, 2])
def test_unshuffle_wide_rows(impl, dtypes, prefix):
    """D = 300: more than one 256-wide chunk per row (and a partial one); prefix 2 as well as the class token."""
    _check_unshuffle(impl, 3, 5, 21, 300, prefix, dtypes, True, seed=40)


@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("dtypes", UNSHUFFLE_DTYPES[:2], ids=UNSHUFFLE_IDS[:2])
def test_unshuffle_model_sizes(impl, dtypes):
    """The decoder's call at ViT-L/8 token counts (batch 3): class token in place, 256 of 1024 visible, D = 512."""
    _check_unshuffle(impl, 3, 256, 1024, 512, 1, dtypes, True, seed=10)


@pytest.mark.parametrize("impl", IMPLS)
def test_unshuffle_output_dtype_rules(impl):
    """Default: the promotion of the three dtypes (pos included); an out_dtype the kernels have no instance for
    (float64) runs the reference under "auto" and is refused by name; a non-float out_dtype is an error."""
    x, token, ids, pos = _unshuffle_inputs(2, 3, 7, 8, 1, torch.bfloat16, torch.bfloat16, True, seed=12,
                                           dev=device(impl))
    auto = "auto" if runs_by_default(impl) else impl
    assert ops.unshuffle(x, token, ids, pos, prefix=1, impl=auto).dtype == torch.bfloat16
    assert ops.unshuffle(x, token, ids, pos.float(), prefix=1, impl=auto).dtype == torch.float32
    assert ops.unshuffle(x, token.half(), ids, prefix=1, impl=auto).dtype == torch.float32  # bf16 + f16 -> f32
    assert ops.last_impl("unshuffle") == impl
    if runs_by_default(impl):
        fallbacks = ops.fallbacks["unshuffle"]
        out = ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.float64)
        assert out.dtype == torch.float64 and ops.last_impl("unshuffle") == "reference"
        assert ops.fallbacks["unshuffle"] == fallbacks + 1  # counted
    with pytest.raises(RuntimeError, match="cannot take these inputs"):
        ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.float64, impl=impl)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point dtype"):
        ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.int32)


@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("prefix", [0, 1])
def test_unshuffle_rejects_out_of_range_ids(impl, prefix):
    x = torch.randn(2, prefix + 3, 8)
    ids = torch.tensor([[0, 1, 2, 3, 9], [4, 3, 2, 1, 0]])
    with pytest.raises(RuntimeError, match="outside"):
        ops.unshuffle(x, torch.randn(8), ids, impl=impl, prefix=prefix)


def test_the_reference_kernel_is_the_op_default():
    """The op computed by its reference kernel (what a device without a fused kernel runs) equals the reference."""
    x, token, ids, pos = _unshuffle_inputs(2, 3, 7, 8, 1, torch.float32, torch.float32, True, seed=13)
    leaves = [t.detach().clone().requires_grad_() for t in (x, token, pos)]
    out = ops.unshuffle(*leaves[:2], ids, leaves[2], prefix=1, impl="reference")
    grad_out = torch.randn(out.shape, generator=gen(14))
    ref_grads = torch.autograd.grad(out, leaves, grad_out)
    from mae_fast.ops.unshuffle import unshuffle_op

    leaves2 = [t.detach().clone().requires_grad_() for t in (x, token, pos)]
    with ops.use_impl("reference"):  # the ops' default bodies, forward and backward
        got = unshuffle_op(*leaves2[:2], ids, leaves2[2], 1, None)
        assert torch.equal(got, out)
        for a, b in zip(torch.autograd.grad(got, leaves2, grad_out), ref_grads):
            torch.testing.assert_close(a, b)
