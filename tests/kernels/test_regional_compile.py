"""Regional compilation compiles one graph per block type: ViT-L/8 (24 encoder + 8 decoder blocks) and CA-MAE at
toy width each give one Dynamo graph per distinct block class, none recompiled, no block left eager; the peer
stack's timm encoder (an nn.Sequential) is compiled block by block too."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mae_fast.compiling import compile_blocks, repeated_blocks
from mae_fast.models import create_model

TOY = dict(img_size=32, embed_dim=64, num_heads=4, decoder_dim=32, decoder_heads=4)


class CountingBackend:
    """A Dynamo backend that runs each graph as traced (eager) and counts the graphs it was handed."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["mae_vit_large_patch8_256", "camae_vit_large_patch8_256"])
def test_one_graph_per_block_type(preset):
    torch.manual_seed(0)
    model = create_model(preset, **TOY)
    backend = CountingBackend()
    n = compile_blocks(model, backend)
    blocks = repeated_blocks(model)
    assert n == len(blocks) >= 28  # ViT-L: 24 encoder blocks, then the decoder's
    images = torch.randint(0, 255, (2, model.cfg.in_chans, 32, 32), dtype=torch.uint8)
    for _ in range(2):  # a second step reuses every graph
        model(images).loss.backward()
    block_types = {type(b) for b in blocks}
    assert len(backend.graphs) == len(block_types), (len(backend.graphs), block_types)
    assert not counters["recompiles"] and not counters["graph_break"]
    assert int(counters["stats"]["unique_graphs"]) == len(block_types)
    # every block ran compiled: each call of a compiled block goes through Dynamo's cache (no eager fallback
    # once a recompile limit is hit: that would show as more frames than graphs)
    assert not counters["frames"].get("total", 0) > counters["frames"].get("ok", 0)


def test_block_rates_differ_but_the_graph_is_shared():
    """What used to split the graphs: each block's stochastic-depth rate (0 .. 0.3 across ViT-L's 24 blocks) is a
    buffer, so it varies per block while the compiled code is the same."""
    model = create_model("mae_vit_large_patch8_256", **TOY)
    rates = {round(float(b.drop_path.keep_prob), 6) for b in model.encoder.blocks}
    assert len(rates) == len(model.encoder.blocks)
    assert "keep_prob" not in "".join(model.state_dict())  # not part of checkpoints


def test_peer_encoder_blocks_are_found_and_compiled():
    pytest.importorskip("timm")
    from mae_fast.perf.peer import PeerMAE
    from mae_fast.models import model_config

    cfg = model_config("mae_vit_small_patch16_256", **TOY)
    peer = PeerMAE(cfg)
    encoder_blocks = list(peer.encoder.blocks)
    assert isinstance(peer.encoder.blocks, torch.nn.Sequential) and len(encoder_blocks) == cfg.depth
    found = {id(b) for b in repeated_blocks(peer)}
    assert all(id(b) in found for b in encoder_blocks)
    backend = CountingBackend()
    compile_blocks(peer, backend)
    images = torch.randint(0, 255, (2, cfg.in_chans, 32, 32), dtype=torch.uint8)
    peer(images).backward()  # the peer returns its loss
    # every encoder block ran compiled; timm keeps each block's stochastic-depth rate as a Python float, so its
    # blocks get a graph each (the peer as its users get it): depth encoder graphs + the decoder's one
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in encoder_blocks)
    assert len(backend.graphs) == cfg.depth + 1
    assert not counters["graph_break"]


def test_channel_stacks_run_by_another_module_are_not_blocks():
    """A CA-MAE channel's own block stack runs inside the channel-stacked layers: FSDP must not shard it alone and
    compilation must not wrap it (it never runs on its own)."""
    model = create_model("camae_vit_micro_patch16_256", img_size=32)
    found = {id(b) for b in repeated_blocks(model)}
    for stack in model.decoder.decoders:
        assert not any(id(b) in found for b in stack)
