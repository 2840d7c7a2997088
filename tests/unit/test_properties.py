"""Property-based tests (hypothesis, a test extra): they skip, with the reason, where hypothesis is not installed
(the GPU machine's image has none), so the modules around them collect everywhere."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is a test extra (pip install mae_fast[test])")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mae_fast.evaluation import order_statistics  # noqa: E402
from mae_fast.evaluation.recall import COSINE_RANGE  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=300),
    splits=st.lists(st.integers(0, 300), max_size=5),
    bins=st.sampled_from([1, 2, 7, 256]),
    data=st.data(),
)
def test_order_statistics_exact_with_ties_and_out_of_range(values, splits, bins, data):
    array = np.round(np.asarray(values, dtype=np.float32), 1)           # ties; values outside COSINE_RANGE
    chunks = np.split(array, sorted(s % (array.size + 1) for s in splits))
    ranks = data.draw(st.lists(st.integers(0, array.size - 1), min_size=1, max_size=6))
    got = order_statistics(lambda: iter(chunks), ranks, COSINE_RANGE, bins)
    np.testing.assert_array_equal(got, np.sort(array)[ranks])


@settings(max_examples=25, deadline=None)
@given(p=st.sampled_from([4, 8, 16]), planes=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-3, 1e3))
def test_parseval_orthonormal_squared_error_equals_pixel_mse(p, planes, seed, scale):
    """With the orthonormal DFT, sum |F x - F y|^2 = sum (x - y)^2: the squared-error form of the Fourier loss
    carries no information beyond the pixel MSE, which is why the loss uses the L1 of magnitudes instead."""
    g = _gen(seed)
    x = torch.randn(planes, p, p, generator=g, dtype=torch.float64) * scale
    y = torch.randn(planes, p, p, generator=g, dtype=torch.float64) * scale
    spectral = (torch.fft.fft2(x, norm="ortho") - torch.fft.fft2(y, norm="ortho")).abs().pow(2).mean()
    torch.testing.assert_close(spectral, (x - y).pow(2).mean(), rtol=1e-10, atol=0)
    # the same identity through the p x p DFT matrix the kernels use (unnormalised: divide by p^2)
    k = torch.arange(p, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(k, k) / p
    W = torch.complex(torch.cos(angle), -torch.sin(angle))
    fx, fy = W @ x.to(W.dtype) @ W, W @ y.to(W.dtype) @ W
    torch.testing.assert_close((fx - fy).abs().pow(2).mean() / p**2, (x - y).pow(2).mean(), rtol=1e-10, atol=0)
