"""Block-wise embedding tables (`mae-fast embed --blocks`, a `block` column): one evaluation source per encoder block,
and the block to headline chosen without the relationships being scored (`choose_block`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .result import EvalConfig, EvaluationResult
from .table import BLOCK_COLUMN, EvaluationInputError, WellTable, load_table, well_table_from_frame


def block_source(name: str, block: int) -> str:
    """The source name of one encoder block of a block-wise table."""
    return f"{name} block {block}"


def source_tables(source, config: EvalConfig, name: str) -> dict[str, WellTable]:
    """{source name: well table} of the embeddings: {name: table}, or for a block-wise table (a `block` column,
    `mae-fast embed --blocks`) one source per block in block order, `block_source(name, b)`."""
    if isinstance(source, WellTable):
        return {name: source}
    frame, where = load_table(source, config.columns.perturbation)
    where = where if where != "<DataFrame>" else name
    if BLOCK_COLUMN not in frame.columns:
        return {name: well_table_from_frame(frame, config.columns, where, config.tvn_batch_level)}
    blocks = pd.to_numeric(frame[BLOCK_COLUMN], errors="coerce")
    if blocks.isna().any() or (blocks != blocks.round()).any():
        raise EvaluationInputError(f"{where}: column {BLOCK_COLUMN!r} must hold encoder block numbers")
    return {block_source(name, int(b)): well_table_from_frame(
                frame[blocks == b].drop(columns=[BLOCK_COLUMN]).reset_index(drop=True), config.columns,
                f"{where} (block {int(b)})", config.tvn_batch_level)
            for b in sorted(blocks.unique())}


def choose_block(result: EvaluationResult, name: str) -> dict | None:
    """The block to headline, chosen without the relationships being scored: the highest phenotypic activity mAP
    (replicate wells vs negative controls -- only the perturbation labels; ties go to the deeper block). None for a
    table without blocks; the last block (and why) when activity mAP was not computed."""
    prefix = block_source(name, "")
    scores = {int(k[len(prefix):]): s.activity_map for k, s in result.sources.items() if k.startswith(prefix)}
    if not scores:
        return None
    last = max(scores)
    finite = {b: v for b, v in scores.items() if np.isfinite(v)}
    chosen = max(finite, key=lambda b: (finite[b], b)) if finite else last
    return {"criterion": "phenotypic activity mAP (replicate wells vs negative controls; no relationships used)"
                         if finite else "none computed (activity mAP off): the last block",
            "block": chosen, "source": block_source(name, chosen), "last_block": last,
            "last_source": block_source(name, last),
            "activity_map": {str(b): (float(v) if np.isfinite(v) else None) for b, v in sorted(scores.items())}}
