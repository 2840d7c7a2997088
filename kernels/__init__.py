"""Triton kernels of the fused ops (installed as `mae_fast.kernels`).

Each op file holds a kernel, its launcher and, where the op has a backward, a `torch.autograd.Function`.
Importing this package never requires Triton; the op modules import it lazily.
"""
