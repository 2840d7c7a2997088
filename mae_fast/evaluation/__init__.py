"""Evaluation of embeddings: recall of known biological relationships (the papers' benchmark, EFAAR conventions)
and JUMP's mean average precision, for the model and the baselines, with uncertainty.

    from mae_fast.evaluation import evaluate, EvalConfig, efaar_relationships, write_outputs
    result = evaluate("embeddings.parquet", efaar_relationships(["CORUM", "StringDB"]), arms="gene_arms.csv",
                      baselines=("random", "pixel-stats", "cellprofiler"), images_root="screen/",
                      gene_classes={"POLR2A": "texture", ...})
    result.table()          # one row per (source, database, phenotype_class), see below
    print(result.markdown())
    write_outputs(result, "eval_out/", heatmap_relationships="CORUM")

API (the shape other code relies on):
    evaluate(embeddings, relationships, *, arms=None, config=EvalConfig(), baselines=(), pixel_stats=None,
             cellprofiler=None, images_root=None, gene_classes=None, name="model") -> EvaluationResult
    EvaluationResult.table(tail=None) -> DataFrame, one row per (source, database, phenotype_class):
        source            "model" (or `name`), "random", "pixel-stats", "cellprofiler"
        database          relationship set name (EFAAR's: CORUM, HuMAP, Reactome, SIGNOR, StringDB)
        phenotype_class   "all" (every pair), or a class of `gene_classes` (pairs with both genes in it),
                          "mixed" (two classes), "unclassified" (a gene without a class)
        n_pairs, recall, recall_low, recall_high      recall at the headline tail (5: bottom/top 5%) and its
                          percentile-bootstrap interval over pairs (config.interval = 95%, 1000 resamples)
        seeds, recall_sd  random: mean over config.random_seeds (5) seeds and their sd; 1 / NaN otherwise
        activity_map, activity_retrieved         phenotypic activity (wells vs negative controls): mean mAP over
                          perturbations and fraction with BH-corrected p < 0.05 (per source; NaN on class rows)
        consistency_map, consistency_retrieved   phenotypic consistency (each gene's known partners vs all other
                          perturbations): mean AP over query genes and fraction retrieved
        activity_map_sd, consistency_map_sd      sd over random seeds
    EvaluationResult.recall_table(tail) -> sources x databases recall (the headline numbers only).
    efaar_relationships(names) / corum_complexes(): EFAAR's files from an installed efaar-benchmarking.

Pipeline, per embedding source, all steps identical:
    1. TVN fitted on negative controls (`mae_fast.evaluation.tvn`; variants "batchwise" (default) and "efaar1.0");
    2. chromosome-arm correction when a gene -> arm table is given;
    3. phenotypic activity mAP on these well-level profiles (`mae_fast.evaluation.average_precision`);
    4. spherical mean of replicate wells per perturbation, origin at the negative controls' mean;
    5. cosine similarity between perturbations; null = all distinct pairs; exact percentiles;
    6. recall = fraction of known pairs in the bottom t% or top t% of the null (t = 5 by default), its bootstrap
       interval, per class, and the recall-vs-percentile curve; phenotypic consistency mAP per database.

Modules, by pipeline stage:
    table.py       read and validate an embeddings table (one row per well)
    tvn.py         typical variation normalisation fitted on negative controls
    aggregate.py   chromosome-arm correction and spherical-mean aggregation per perturbation
    recall.py      cosine similarities, exact null percentiles, relationship files, recall
    null_models.py random embeddings and the pixel-statistics baseline (the null models every table shows)
    cellprofiler.py  CellProfiler-style baseline (scikit-image segmentation, cp-measure features)
    average_precision.py  JUMP's mAP: phenotypic activity and consistency, p-values, BH correction
    databases.py   EFAAR's relationship databases read from an installed efaar-benchmarking
    result.py      EvalConfig and the results with their table views (table, recall_table, markdown)
    blocks.py      block-wise embedding tables (a `block` column): a source per block, the block to headline
    pipeline.py    `evaluate`: all of the above for the model and the baselines
    report.py      JSON, Markdown, recall-vs-percentile plot, similarity heat map
"""
from mae_fast.evaluation.aggregate import (
    ArmCorrectionReport,
    ArmTable,
    PerturbationMeans,
    chromosome_arm_correction,
    group_means,
    load_arm_table,
    spherical_mean,
)
from mae_fast.evaluation.average_precision import (
    MAPResult,
    activity_average_precision,
    benjamini_hochberg,
    consistency_average_precision,
    mean_average_precision,
)
from mae_fast.evaluation.null_models import (
    PIXEL_STATISTICS,
    pixel_feature_names,
    pixel_statistics,
    pixel_statistics_table,
    random_embeddings_like,
)
from mae_fast.evaluation.cellprofiler import cellprofiler_table, segment_site, site_cell_features
from mae_fast.evaluation.databases import (
    EFAAR_DATABASES,
    corum_complexes,
    efaar_annotations_dir,
    efaar_relationships,
    parse_relationship_args,
)
from mae_fast.evaluation.pipeline import (
    bootstrap_interval,
    build_perturbation_map,
    combine_seeds,
    evaluate,
    evaluate_map,
)
from mae_fast.evaluation.recall import (
    PairwiseSimilarities,
    RelationshipSet,
    exact_percentiles,
    load_relationships,
    match_pairs,
    order_statistics,
    recall,
    unit_rows,
)
from mae_fast.evaluation.result import (
    markdown_table,
    BASELINES,
    ClassRecall,
    DatabaseRecall,
    EvalConfig,
    EvaluationResult,
    PerturbationMap,
    SourceResult,
)
from mae_fast.evaluation.report import (
    plot_recall_curve,
    plot_similarity_heatmap,
    result_as_dict,
    write_json,
    write_markdown,
    write_outputs,
)
from mae_fast.evaluation.table import ColumnSpec, EvaluationInputError, WellTable, load_table, well_table_from_frame
from mae_fast.evaluation.tvn import TVN_VARIANTS, TVNTransform, fit_tvn, tvn

__all__ = [
    "ClassRecall", "EFAAR_DATABASES", "MAPResult", "TVN_VARIANTS", "activity_average_precision",
    "benjamini_hochberg", "bootstrap_interval", "cellprofiler_table", "combine_seeds",
    "consistency_average_precision", "corum_complexes", "efaar_annotations_dir", "efaar_relationships",
    "mean_average_precision", "parse_relationship_args", "segment_site", "site_cell_features",
    "ArmCorrectionReport", "ArmTable", "BASELINES", "ColumnSpec", "DatabaseRecall", "EvalConfig",
    "EvaluationInputError", "EvaluationResult", "PIXEL_STATISTICS", "PairwiseSimilarities", "PerturbationMap",
    "PerturbationMeans", "RelationshipSet", "SourceResult", "TVNTransform", "WellTable",
    "build_perturbation_map", "chromosome_arm_correction", "evaluate", "evaluate_map", "exact_percentiles",
    "fit_tvn", "group_means", "load_arm_table", "load_relationships", "load_table", "markdown_table",
    "match_pairs", "order_statistics", "pixel_feature_names", "pixel_statistics", "pixel_statistics_table",
    "plot_recall_curve", "plot_similarity_heatmap", "random_embeddings_like", "recall", "result_as_dict",
    "spherical_mean", "tvn", "unit_rows", "well_table_from_frame", "write_json", "write_markdown", "write_outputs",
]
