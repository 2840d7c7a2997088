"""Evaluation internals: input tables, TVN, arm correction, aggregation, recall, mAP, baselines and reports.

The public API is `mae_fast.evaluate`; the modules here are split by pipeline stage:

    table.py       read and validate an embeddings table (one row per well)
    tvn.py         typical variation normalisation fitted on negative controls
    aggregate.py   chromosome-arm correction and spherical-mean aggregation per perturbation
    recall.py      cosine similarities, exact null percentiles, relationship files, recall
    baselines.py   random embeddings and the pixel-statistics baseline
    cellprofiler.py  CellProfiler-style baseline (scikit-image segmentation, cp-measure features)
    average_precision.py  JUMP's mAP: phenotypic activity and consistency, p-values, BH correction
    databases.py   EFAAR's relationship databases read from an installed efaar-benchmarking
    pipeline.py    `evaluate`: all of the above for the model and the baselines
    report.py      JSON, Markdown, recall-vs-percentile plot, similarity heat map
"""
