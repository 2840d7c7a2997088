"""Predicted time of every fused kernel at ViT-L/8 training sizes, written before any GPU run.

    python benchmarks/kernel_predictions.py            # writes benchmarks/results/kernel_predictions.json, table
    python benchmarks/kernel_predictions.py --json OUT.json

Sizes: batch 128 and 256, 256 x 256 x 6 uint16 crops, mask ratio 0.75, patch 8 and 16, decoder 512-d, bf16 autocast
(visible tokens into the decoder and predictions in bf16; the decoder's sequence float32, as the unshuffle promotes
it); Lion over every parameter of mae_vit_large_patch{8,16}_256 (encoder + decoder, float32 params, grads and
momentum).

Per (kernel, size) entry (the schema benchmarks/gpu.sh reads):
    kernel        the op as benchmarks/bench_ops.py names it ("masked_patchify", "unshuffle", "mae_loss",
                  "lion_update"); "unshuffle.forward" / "unshuffle.backward" split the unshuffle pair
    size          "B256 p8" (batch, patch) or "mae_vit_large_patch8_256" for Lion
    bytes         the byte floor: every input read once, every output written once
    floor_s       bytes / COPY_BW
    moved_bytes   what the implementation in this commit moves (extra passes, fp32 outputs, partial buffers)
    flops         the arithmetic the implementation executes (tensor-core FLOPs padded to the tile shapes it uses,
                  plus CUDA-core FLOPs)
    predicted_s   max(moved_bytes / COPY_BW, tc_flops / TC_RATE[unit] + core_flops / CORE_RATE)
    notes         the design the prediction assumes
A measured time t then gives "fraction of floor" = floor_s / t (the issue's goals are stated in it).

Rates: COPY_BW and the bf16 matmul rate were measured on the benchmark H200 (docs/DESIGN.md §6); tf32 is taken as half of
bf16 and the CUDA-core fp32 rate as 60 of the datasheet's 67 TFLOP/s (leads, not measurements). Launch and host
overheads are not modelled (the goals are measured around the public call, so they count against the kernel).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mae_fast.io import atomic_write_json  # noqa: E402

COPY_BW = 4.3e12                      # bytes/s, device copy, measured (docs/DESIGN.md §6)
TC_RATE = {"bf16": 790e12, "tf32": 395e12}  # FLOP/s, dense matmul on the tensor cores (bf16 measured, tf32 = half)
CORE_RATE = 60e12                     # FLOP/s, fp32 FMA units (lead: 0.9 x datasheet)

IMG, CHANNELS, RATIO, DECODER_DIM = 256, 6, 0.75, 512
PIXEL_BYTES, ACT_BYTES, F32, I64 = 2, 2, 4, 8  # uint16 pixels, bf16 activations
BATCHES, PATCHES = (128, 256), (8, 16)
SMS = 132                             # H200 multiprocessors
OUT = os.path.join(ROOT, "benchmarks", "results", "kernel_predictions.json")


def geometry(batch: int, patch: int) -> dict:
    L = (IMG // patch) ** 2
    K = int(L * (1 - RATIO))          # as ops.num_visible
    return dict(B=batch, p=patch, L=L, K=K, M=L - K, P=patch * patch * CHANNELS, C=CHANNELS)


def entry(kernel: str, size: str, bytes_floor: float, moved: float, tc_flops: float, tc_unit: str | None,
          core_flops: float, notes: str, more_tc: dict | None = None) -> dict:
    """`tc_flops` on `tc_unit`, plus `more_tc` {unit: FLOPs} for kernels that use two tensor-core precisions."""
    tc = {tc_unit: tc_flops} if tc_unit else {}
    for unit, n in (more_tc or {}).items():
        tc[unit] = tc.get(unit, 0.0) + n
    compute_s = sum(n / TC_RATE[unit] for unit, n in tc.items()) + core_flops / CORE_RATE
    row = {"kernel": kernel, "size": size, "bytes": int(bytes_floor), "floor_s": bytes_floor / COPY_BW,
           "moved_bytes": int(moved), "flops": int(sum(tc.values()) + core_flops),
           "predicted_s": max(moved / COPY_BW, compute_s), "notes": notes}
    if tc:
        row["tensor_core_flops"] = {unit: int(n) for unit, n in tc.items()}
    return row


L2_BYTES = 50 * 2**20                 # H200 L2
L2_CHUNK_BYTES = 24 * 2**20           # kernels/masked_patchify.py: images per (stats, patchify) launch pair
STATS_TILE = 4096                     # kernels/masked_patchify.py: pixels per stats program


def masked_patchify(g: dict) -> dict:
    """Image + ids_restore read; visible in the autocast dtype (bf16) and the float32 loss target written.
    This commit: per chunk of images (24 MiB, i.e. 32 images of 256^2 x 6 uint16), a split-plane statistics
    launch (16 programs of 4,096 pixels per plane, 12 bytes of partials each) reads the chunk from DRAM; the
    patchify launch re-reads it from L2 (the chunk is about half of the 50 MB L2, nothing else runs between the two
    launches), merges the partials on chip (each program reads its image's C x 16 partials from L2) and writes
    visible in bf16 and target in fp32 with contiguous row loads permuted on chip. DRAM bytes = the floor + the
    partials (written once, read from L2)."""
    B, L, K, M, P = g["B"], g["L"], g["K"], g["M"], g["P"]
    image = B * CHANNELS * IMG * IMG * PIXEL_BYTES
    ids = B * L * I64
    floor = image + ids + B * K * P * ACT_BYTES + B * M * P * F32
    per_image = CHANNELS * IMG * IMG * PIXEL_BYTES
    chunk = max(1, L2_CHUNK_BYTES // per_image)
    assert chunk * per_image <= L2_BYTES // 2
    partials = B * CHANNELS * (IMG * IMG // STATS_TILE) * 3 * F32
    moved = floor + partials
    core = B * CHANNELS * IMG * IMG * 6.0  # stats (sum, centred square) + standardise (sub, mul)
    row = entry("masked_patchify", f"B{B} p{g['p']}", floor, moved, 0, None, core,
                f"one DRAM read of the uint16 image (the patchify launch's second read from L2, chunks of {chunk} "
                f"images), visible bf16, target fp32, {partials} bytes of stats partials; "
                f"{2 * -(-B // chunk)} launches (2 per chunk), launch gaps not modelled")
    row["launches"] = 2 * -(-B // chunk)
    row["l2_reread_bytes"] = image
    return row


def unshuffle(g: dict) -> list[dict]:
    """What MAEDecoder runs under bf16 autocast: `ops.unshuffle(x, mask_token, ids_restore, pos_embed[0],
    prefix=1)`, the class token placed by the kernel (no torch.cat around it), x bf16 in and the decoder sequence
    float32 out (bf16 tokens with the float32 mask token and positions promote to float32, as the cat did).
    forward: x (B, 1 + K, D) bf16, pos (1 + L, D) fp32, ids, mask token (fp32) read; out (B, 1 + L, D) fp32 written.
    backward: grad_out (B, 1 + L, D) fp32, ids read; grad_x (B, 1 + K, D) bf16 written (converted as it is stored)
    and the mask token's fp32 gradient (the positions are a buffer: no gradient).
    This commit's kernels move exactly that, plus the backward's per-program float32 sums (4 programs per SM x D,
    written and re-read: ~1 MB)."""
    B, L, K, D = g["B"], g["L"], g["K"], DECODER_DIM
    size = f"B{B} p{g['p']}"
    ids = B * L * I64
    x = B * (K + 1) * D * ACT_BYTES
    out = B * (L + 1) * D * F32
    pos = (L + 1) * D * F32
    fwd_floor = x + pos + ids + D * F32 + out
    bwd_floor = out + ids + x + D * F32
    sums = 2 * 4 * SMS * D * F32
    fwd_core = B * L * D * 1.0
    bwd_core = B * (L - K) * D * 1.0
    notes = "decoder dim 512, prefix=1 (class token placed by the kernel, no torch.cat), x bf16 in, out fp32"
    return [
        entry("unshuffle.forward", size, fwd_floor, fwd_floor, 0, None, fwd_core, notes),
        entry("unshuffle.backward", size, bwd_floor, bwd_floor + sums, 0, None, bwd_core, notes),
        entry("unshuffle", size, fwd_floor + bwd_floor, fwd_floor + bwd_floor + sums, 0, None, fwd_core + bwd_core,
              notes + " (forward + backward, as bench_ops times it)"),
    ]


def _pad(n: int, tile: int) -> int:
    return -(-n // tile) * tile


def mae_loss(g: dict) -> list[dict]:
    """Forward + backward of the fused MAE + Fourier loss on the masked tokens.

    Floor (the one-op design: full prediction (B, L, P) + masked ids in): masked rows of pred (bf16) and the
    float32 target read, ids read, the gradient wrt the full prediction (B, L, P) bf16 written (zeros at visible
    tokens, scaled by the incoming gradient inside the kernel).

    `ops.mae_loss` on gathered tokens (entry "mae_loss"; what a caller holding pred_masked gets): pred_masked
    gathered by torch (read B M P + write B M P), the kernel reads pred_masked and
    target, writes grad (B, M, P) in pred's dtype; backward multiplies it by grad_loss (read + write) and the
    gather's backward scatters it into a zero-filled (B, L, P) tensor (write B L P, read + write B M P).
    DFT FLOPs per p x p plane (planes = B M C, padded to the tile where the kernel pads), forward (spectra of x and
    y, tf32) and backward (the adjoint for x, bf16):
      p = 8, Kronecker (p^2 x p^2 table, 64-plane tiles, no padding): forward 2 signals x 2 real products of
      (1 x p^2)(p^2 x p^2) = 8 p^4, adjoint 4 p^4.
      p = 16, separable (F = W X W, tiles of 8 planes: 6 channels padded to 8): rows 2 real products of p^3 per
      signal (4 p^3 FLOPs), columns 4 (8 p^3): forward 24 p^3, adjoint 12 p^3. The Hermitian half is not used
      (power-of-two tiles pad p/2 + 1 columns back to p)."""
    B, L, M, P, p, C = g["B"], g["L"], g["M"], g["P"], g["p"], g["C"]
    size = f"B{B} p{p}"
    planes = B * M * C
    floor = B * M * P * ACT_BYTES + B * M * P * F32 + B * M * I64 + B * L * P * ACT_BYTES
    gathered = B * M * P * ACT_BYTES
    # gather (read + write G), kernel (read G + target, write G), grad * grad_loss (read + write G), gather's
    # backward (zero-filled (B, L, P) written, then G read and G scattered, ids read)
    moved_now = 7 * gathered + B * M * P * F32 + B * L * P * ACT_BYTES + B * M * I64
    core = planes * p * p * 24.0  # magnitudes, sign, 1/|Fx|, scaling, MSE terms per frequency and pixel
    if p >= 16:
        padded = B * M * (1 << (C - 1).bit_length())
        tc = {"tf32": padded * 24.0 * p ** 3, "bf16": padded * 12.0 * p ** 3}
        form = "separable F = W X W, 8-plane (128-row) tiles, channels padded 6 -> 8"
    else:
        tc = {"tf32": planes * 8.0 * p ** 4, "bf16": planes * 4.0 * p ** 4}
        form = "Kronecker p^2 x p^2 table, 64-plane tiles"
    out = [entry("mae_loss", size, floor, moved_now, 0, None, core,
                 f"ops.mae_loss on gathered tokens: {form}, persistent grid; spectra on tf32 wgmma, adjoint on bf16 "
                 "wgmma, fp32 accumulation; torch gather + grad scaling + scatter around the kernel", more_tc=tc)]
    # the one op on the full prediction (ops.masked_mae_loss -> masked_mae_loss_triton, what the model runs):
    # the loss kernel reads the masked rows of pred in place and writes grad (B, M, P); backward reads it and
    # ids_restore and writes the scaled (B, L, P) gradient: floor + grad (B, M, P) written and read + ids_restore
    one_op = floor + 2 * gathered + B * L * I64
    out.append(entry("mae_loss.full_prediction", size, floor, one_op, 0, None, core,
                     f"masked_mae_loss_triton ({form}, persistent grid): gather, scatter and grad_loss scaling "
                     "folded into the loss kernel and one backward pass; what the model's train step runs",
                     more_tc=tc))
    return out


def lion(model: str, n_params: int, n_tensors: int) -> dict:
    """param, grad, exp_avg read (float32), param and exp_avg written: 20 bytes per parameter."""
    floor = n_params * (3 * F32 + 2 * F32)
    core = n_params * 8.0
    return entry("lion_update", model, floor, floor, 0, None, core,
                 f"{n_params} float32 parameters in {n_tensors} tensors (encoder + decoder); host overhead "
                 "not modelled")


def model_params(name: str) -> tuple[int, int]:
    import torch

    from mae_fast import models

    with torch.device("meta"):
        model = models.create_model(name)
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), len(params)


def predictions() -> list[dict]:
    out = []
    for batch in BATCHES:
        for patch in PATCHES:
            g = geometry(batch, patch)
            out.append(masked_patchify(g))
            out.extend(unshuffle(g))
            out.extend(mae_loss(g))
    for patch in PATCHES:
        name = f"mae_vit_large_patch{patch}_256"
        out.append(lion(name, *model_params(name)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=OUT, help=f"output path (default {OUT})")
    args = parser.parse_args(argv)
    rows = predictions()
    doc = {"copy_bw_bytes_per_s": COPY_BW, "tensor_core_flops_per_s": TC_RATE, "cuda_core_flops_per_s": CORE_RATE,
           "measured": "not measured on a GPU", "source": "benchmarks/kernel_predictions.py", "kernels": rows}
    atomic_write_json(args.json, doc)
    for r in rows:
        print(f"{r['kernel']:<28} {r['size']:<26} floor {r['floor_s'] * 1e6:8.1f} us  predicted "
              f"{r['predicted_s'] * 1e6:8.1f} us  ({r['floor_s'] / r['predicted_s']:.0%} of floor)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
