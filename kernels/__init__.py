"""Triton kernels of the fused ops (installed as `mae_fast.kernels`).

Each op file holds a kernel, its launcher and the torch op around it (`mae_fast::<op>_triton`, made by the
`mae_fast.ops.define_*_op` factories, with a fake implementation and, where the op has a backward, an autograd
formula), so that torch.compile keeps every fused op as one opaque node. Importing this package never requires Triton;
`register_all` imports the op modules (and with them Triton) only when Triton is importable.

    masked_patchify.py  split-plane statistics + masked patchify + standardise, L2-sized chunks (one DRAM read)
    unshuffle.py        decoder unshuffle + positional embedding, forward and backward
    mae_loss.py         MSE + Fourier loss with the gradient wrt pred in the same pass (separable DFT for p >= 16,
                        Kronecker for p <= 8); also the one op on the full prediction (masked_mae_loss_triton)
    lion.py             multi-tensor Lion: one launch per dtype combination through a pointer table
"""
from __future__ import annotations


def register_all(register) -> None:
    """Register the "triton" backend of every op (nothing when Triton cannot be imported)."""
    try:
        from mae_fast.kernels import lion, mae_loss, masked_patchify, unshuffle
    except ImportError:  # no Triton (or a broken install): the ops stay on their C++ / reference backends
        return
    register("masked_patchify", "triton")(masked_patchify.masked_patchify_triton)
    register("unshuffle", "triton")(unshuffle.unshuffle_triton)
    register("mae_loss", "triton")(mae_loss.mae_loss_triton)
    register("lion_update", "triton")(lion.lion_update_triton)
