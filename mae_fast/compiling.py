"""Per-block transforms of a model: regional compilation (torch.compile each transformer block instead of the whole
model) and selective activation checkpointing.

A whole-model compile of ViT-L/8 (24 encoder + 8 decoder blocks) traces and lowers every block again: minutes of
cold compile. Compiled per block, Dynamo traces a block type once and reuses the graph for every instance (block
parameters and buffers are graph inputs; per-block constants such as the stochastic-depth rate are buffers, not
Python numbers Dynamo would specialise on), so compile time is paid per block type -- one graph for the encoder's
blocks, one for the decoder's (tests/kernels/test_compile.py counts them) -- and the code between blocks (masking,
unshuffle, loss) stays eager, where mae_fast's fused ops run anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict, nn.Sequential)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`, in model order: the elements of every nn.ModuleList that are modules with
    a forward of their own (mae_fast's encoder and decoder blocks, the CA-MAE decoder's channel-stacked layers), and
    of every nn.Sequential of two or more modules of one class (timm's `VisionTransformer.blocks`, so the peer stack
    compiles its encoder too). Modules another module runs itself -- listed in its `blocks` tuple, as a CA-MAE
    channel's own stack is run by the channel-stacked layers -- are not blocks: they never run on their own."""
    run_by_others = {id(b) for m in model.modules() if isinstance(getattr(m, "blocks", None), tuple)
                     for b in m.blocks}
    out = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            members = [m for m in module if not isinstance(m, _CONTAINERS)]
        elif isinstance(module, nn.Sequential) and len(module) > 1 and len({type(m) for m in module}) == 1:
            members = [m for m in module if not isinstance(m, _CONTAINERS)]
        else:
            continue
        out.extend(m for m in members if id(m) not in run_by_others)
    return out


def compile_blocks(model: nn.Module, backend: str = "inductor", dynamic: bool = False) -> int:
    """Compile every repeated block of `model` in place (`nn.Module.compile`); returns how many.

    Blocks of one type share one graph (see the module doc). The recompile limit is still raised to the block
    count: a block type whose instances differed in a Python constant would otherwise silently run eagerly past
    Dynamo's limit (the graph-count test would show the extra graphs)."""
    blocks = repeated_blocks(model)
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first; older torch has only the second
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), len(blocks) + 8))
            break
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
    return len(blocks)


# matrix products and attention are what is expensive to recompute; norms, activations, LayerScale, residual adds
# and copies are cheap to recompute and hold most of a block's activation bytes
SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default,  # the CA-MAE decoder's channel-stacked projections
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def selective_checkpointing(model: nn.Module) -> int:
    """Selective activation checkpointing of every repeated block, in place: during training a block keeps the
    outputs of its matrix products and attention and recomputes the rest in backward (RNG state preserved, so
    stochastic depth draws the same). Parameter names are unchanged (the block's forward is wrapped, not the
    module). Returns how many blocks."""
    blocks = repeated_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)

        block.forward = forward
    return len(blocks)
