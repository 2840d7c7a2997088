"""Inference: turn a screen into embeddings.

    embed.py   every site tiled into crops (`mae_fast.data.tiling`), embedded by a trained MAE / CA-MAE or a baseline,
               averaged per site and per well, written as parquet tables resumable plate by plate (`mae-fast embed`)
    blocks.py  which encoder blocks `embed --blocks` writes (a `block` column), checked before any work
"""
