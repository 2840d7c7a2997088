"""Data: the built-in synthetic screen, dataset readers, crop pipelines and tiling."""
