"""The compiled backends of the fused ops, each a plugin of `mae_fast.ops.dispatch` with `register_all(register)`:

    triton.py  the Triton kernels of `kernels/` (CUDA tensors; the CPU under TRITON_INTERPRET=1), and the one place
               that imports that folder, installed (`mae_fast.kernels`) or from a source checkout
    cpp.py     the C++ CPU kernels of `csrc/` (the optional extension `mae_fast._C`)

The dispatcher imports them by name on the first call of an op; importing this package imports neither.
"""
