"""Evaluation of embeddings by recall of known biological relationships (the papers' benchmark, EFAAR conventions).

    from mae_fast.evaluate import evaluate, EvalConfig, write_outputs
    result = evaluate("embeddings.parquet", {"CORUM": "corum.csv"}, arms="gene_arms.csv",
                      baselines=("random", "pixel-stats"), images_root="screen/")
    print(result.markdown())
    write_outputs(result, "eval_out/", heatmap_relationships="CORUM")

Pipeline, per embedding source (model, random, pixel statistics), all steps identical:
    1. TVN fitted on negative controls (see `mae_fast.evaluation.tvn`), per experimental batch;
    2. chromosome-arm correction when a gene -> arm table is given;
    3. spherical mean of replicate wells per perturbation, origin at the negative controls' mean;
    4. cosine similarity between perturbations; null = all distinct pairs; exact percentiles;
    5. recall = fraction of known pairs in the bottom t% or top t% of the null (t = 5 by default), and the
       recall-vs-percentile curve.
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
from mae_fast.evaluation.baselines import (
    PIXEL_STATISTICS,
    pixel_feature_names,
    pixel_statistics,
    pixel_statistics_table,
    random_embeddings_like,
)
from mae_fast.evaluation.pipeline import (
    BASELINES,
    DatabaseRecall,
    EvalConfig,
    EvaluationResult,
    PerturbationMap,
    SourceResult,
    build_perturbation_map,
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
from mae_fast.evaluation.report import (
    markdown_table,
    plot_recall_curve,
    plot_similarity_heatmap,
    result_as_dict,
    write_json,
    write_markdown,
    write_outputs,
)
from mae_fast.evaluation.table import ColumnSpec, EvaluationInputError, WellTable, load_table, well_table_from_frame
from mae_fast.evaluation.tvn import TVNTransform, fit_tvn, tvn

__all__ = [
    "ArmCorrectionReport", "ArmTable", "BASELINES", "ColumnSpec", "DatabaseRecall", "EvalConfig",
    "EvaluationInputError", "EvaluationResult", "PIXEL_STATISTICS", "PairwiseSimilarities", "PerturbationMap",
    "PerturbationMeans", "RelationshipSet", "SourceResult", "TVNTransform", "WellTable",
    "build_perturbation_map", "chromosome_arm_correction", "evaluate", "evaluate_map", "exact_percentiles",
    "fit_tvn", "group_means", "load_arm_table", "load_relationships", "load_table", "markdown_table",
    "match_pairs", "order_statistics", "pixel_feature_names", "pixel_statistics", "pixel_statistics_table",
    "plot_recall_curve", "plot_similarity_heatmap", "random_embeddings_like", "recall", "result_as_dict",
    "spherical_mean", "tvn", "unit_rows", "well_table_from_frame", "write_json", "write_markdown", "write_outputs",
]
