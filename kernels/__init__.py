"""Triton kernels of the fused ops (installed as `mae_fast.kernels`).

Each op file holds a kernel and its launcher, and registers them at import as the "triton" kernel of the op they
belong to for CUDA tensors (`register_kernel(..., "cuda", ...)` of `mae_fast/ops/<op>.py`, the only module of
mae_fast it imports besides `_common.py`). Importing this package never requires Triton; `mae_fast.ops.triton`
imports the op files (installed, or from a source checkout) when CUDA or the interpreter is on and Triton imports.

    masked_patchify.py  split-plane statistics + masked patchify + standardise, L2-sized chunks (one DRAM read)
    unshuffle.py        decoder unshuffle + positional embedding, forward and backward
    mae_loss.py         MSE + Fourier loss with the gradient wrt pred in the same pass (separable DFT for p >= 16,
                        Kronecker for p <= 8), reading the masked rows of the full prediction in place, + its scatter
    lion.py             multi-tensor Lion: one launch per dtype combination through a pointer table
"""
