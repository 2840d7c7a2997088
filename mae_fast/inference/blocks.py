"""Which encoder blocks `embed --blocks` writes: parsed and checked against the model before any work."""
from __future__ import annotations

import torch

from mae_fast.models.mae import parse_blocks
from mae_fast.training.config import ConfigError


def embedding_blocks(blocks, model: torch.nn.Module) -> list[int] | None:
    """`blocks` ("all", block numbers, or a comma list "2,4") -> sorted 1-based encoder blocks (None: the plain
    embedding); ConfigError for a model without transformer blocks or a block out of range."""
    if blocks is None:
        return None
    if not hasattr(model, "encoder"):
        raise ConfigError(f"blocks: block-wise embeddings need a ViT (MAE / CA-MAE); {model.cfg.name} has no "
                          "transformer blocks")
    try:
        return parse_blocks(blocks, model.cfg.depth)
    except ValueError as err:
        raise ConfigError(f"blocks: {err}") from None
