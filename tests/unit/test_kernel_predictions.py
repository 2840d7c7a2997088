"""The roofline predictions (benchmarks/kernel_predictions.py) against hand-counted bytes and FLOPs."""
from __future__ import annotations

import pytest

from tests.helpers import load_benchmark_script


@pytest.fixture(scope="module")
def kp():
    return load_benchmark_script("kernel_predictions")


def test_geometry_vit_l8(kp):
    g = kp.geometry(256, 8)
    assert (g["L"], g["K"], g["M"], g["P"]) == (1024, 256, 768, 384)
    assert kp.geometry(256, 16)["K"] == 64


def test_masked_patchify_floor_by_hand(kp):
    e = kp.masked_patchify(kp.geometry(256, 8))
    image = 256 * 6 * 256 * 256 * 2
    expected = image + 256 * 1024 * 8 + 256 * 256 * 384 * 2 + 256 * 768 * 384 * 4
    assert e["bytes"] == expected
    assert e["floor_s"] == pytest.approx(expected / 4.3e12)
    assert e["predicted_s"] >= e["floor_s"]
    # one DRAM read of the image: moved = floor + the stats partials (16 tiles x 3 floats per plane)
    assert e["moved_bytes"] == expected + 256 * 6 * 16 * 3 * 4
    assert e["launches"] == 2 * 8  # chunks of 32 images (24 MiB)


def test_lion_twenty_bytes_per_parameter(kp):
    e = kp.lion("m", 1000, 3)
    assert e["bytes"] == 20_000 and e["moved_bytes"] == 20_000
    assert e["predicted_s"] == pytest.approx(20_000 / 4.3e12)


def test_loss_flops_by_form(kp):
    """p = 16: separable, 36 p^3 per padded plane (8 per token), tf32 forward and bf16 adjoint; p = 8: Kronecker
    12 p^4. The tensor-core time stays under the bytes. The full-prediction op moves the floor + its (B, M, P)
    gradient written and read + ids_restore; the unfused op 4 (B, M, P) passes more, minus that index read."""
    current, design = kp.mae_loss(kp.geometry(256, 16))
    padded = 256 * 192 * 8
    assert current["tensor_core_flops"] == {"tf32": padded * 24 * 16 ** 3, "bf16": padded * 12 * 16 ** 3}
    compute = padded * 16 ** 3 * (24 / kp.TC_RATE["tf32"] + 12 / kp.TC_RATE["bf16"])
    assert compute < current["moved_bytes"] / kp.COPY_BW
    B, L, M, P = 256, 256, 192, 6 * 256
    assert design["kernel"] == "mae_loss.full_prediction"
    assert design["moved_bytes"] == design["bytes"] + 2 * B * M * P * 2 + B * L * 8
    assert current["moved_bytes"] - design["moved_bytes"] == 4 * B * M * P * 2 - B * L * 8
    kron, _ = kp.mae_loss(kp.geometry(256, 8))
    assert kron["tensor_core_flops"] == {"tf32": 256 * 768 * 6 * 8 * 8 ** 4, "bf16": 256 * 768 * 6 * 4 * 8 ** 4}


def test_schema_fields(kp):
    row = kp.entry("k", "s", 10, 20, 0, None, 0, "n")
    assert {"kernel", "size", "bytes", "flops", "predicted_s", "floor_s", "notes"} <= set(row)


def test_unshuffle_bytes_by_hand(kp):
    """The decoder's call under autocast (prefix=1): x bf16 (B, 1 + K, D) read, out float32 (B, 1 + L, D) written,
    float32 positions (1 + L, D) and mask token read; backward: float32 grad_out read, bf16 grad_x written, the mask
    token's float32 gradient, + the per-program float32 sums (4 programs on each of 132 SMs, written and read)."""
    fwd, bwd, both = kp.unshuffle(kp.geometry(256, 8))
    B, L, K, D = 256, 1024, 256, 512
    x, out, ids = B * (1 + K) * D * 2, B * (1 + L) * D * 4, B * L * 8
    assert fwd["bytes"] == fwd["moved_bytes"] == x + (1 + L) * D * 4 + ids + D * 4 + out
    assert bwd["bytes"] == out + ids + x + D * 4
    assert bwd["moved_bytes"] == bwd["bytes"] + 2 * 4 * 132 * D * 4
    assert both["bytes"] == fwd["bytes"] + bwd["bytes"] and both["kernel"] == "unshuffle"
