"""Triton kernels of the fused ops (installed as `mae_fast.kernels`).

Each op file holds a kernel, its launcher and the torch op around it (`mae_fast::<op>_triton`, made by the
`define_*_op` factories of `mae_fast/ops/<op>.py`, with a fake implementation and, where the op has a backward, an
autograd formula), so that torch.compile keeps every fused op as one opaque node. Importing this package never
requires Triton; `mae_fast.backends.triton` imports it (installed, or from a source checkout) and registers the op
modules only when Triton is importable.

    masked_patchify.py  split-plane statistics + masked patchify + standardise, L2-sized chunks (one DRAM read)
    unshuffle.py        decoder unshuffle + positional embedding, forward and backward
    mae_loss.py         MSE + Fourier loss with the gradient wrt pred in the same pass (separable DFT for p >= 16,
                        Kronecker for p <= 8); also the one op on the full prediction (masked_mae_loss_triton)
    lion.py             multi-tensor Lion: one launch per dtype combination through a pointer table
"""
