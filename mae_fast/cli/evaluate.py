"""`mae-fast evaluate`: recall (with bootstrap intervals) and JUMP mAP of known relationships for an embeddings
table, beside the random (mean over seeds), pixel-stats and CellProfiler-style baselines.

    mae-fast evaluate embeddings.parquet --relationships efaar:CORUM efaar:StringDB mine=pairs.csv --out eval/ \
        --arms gene_arms.csv --baselines random,pixel-stats,cellprofiler --images-root screen/ [--tvn efaar1.0]

Prints the Markdown tables and where the files are (evaluation.json, recall.md, recall_curve.png,
similarity_heatmap.png, pixel_stats.parquet / cellprofiler.parquet when computed).
"""
from __future__ import annotations

import argparse
import math
import os

from mae_fast.io import atomic_write, remove_temporaries
from mae_fast.cli.common import number
from mae_fast.evaluation import (
    BASELINES,
    ColumnSpec,
    EvalConfig,
    EvaluationInputError,
    TVN_VARIANTS,
    cellprofiler_table,
    evaluate,
    parse_relationship_args,
    pixel_statistics_table,
    write_outputs,
)
from mae_fast.evaluation.table import load_table, require_columns
from mae_fast.io import OutputLock, folder_lock_path


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", help="embeddings table (parquet or CSV), one row per well")
    parser.add_argument("--relationships", nargs="+", required=True, metavar="[NAME=]FILE|efaar:DB",
                        help="relationship files (CSV header entity1,entity2; NAME defaults to the file name) and/or "
                             "EFAAR's databases from an installed efaar-benchmarking: efaar:CORUM, efaar:HuMAP, "
                             "efaar:Reactome, efaar:SIGNOR, efaar:StringDB or efaar:all (case-insensitive)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arms", help="gene -> chromosome_arm table (optional column expressed/expression)")
    parser.add_argument("--baselines", type=_names, default=(), help=f"comma-separated: {','.join(BASELINES)}")
    parser.add_argument("--images-root", help="RxRx3-layout folder for the pixel-stats baseline")
    parser.add_argument("--pixel-stats", help="precomputed pixel-statistics table (instead of --images-root)")
    parser.add_argument("--cellprofiler", help="precomputed CellProfiler-style per-well table (instead of "
                                               "--images-root; needs scikit-image and cp-measure otherwise)")
    parser.add_argument("--gene-classes", help="CSV/parquet with columns gene,class: recall and mAP per class")
    parser.add_argument("--channels", type=number(int, minimum=1), default=6,
                        help="image channels for pixel statistics (default 6)")

    columns = parser.add_argument_group("columns")
    columns.add_argument("--perturbation-column", default="gene")
    columns.add_argument("--batch-column", default="experiment_name", help="'none' for a single batch")
    columns.add_argument("--plate-column", default="plate")
    columns.add_argument("--control-values", type=_names, default=("EMPTY_control", "CRISPR_control"),
                         help="perturbation values of negative controls (comma-separated)")
    columns.add_argument("--control-column", help="boolean column marking negative controls (overrides values)")
    columns.add_argument("--feature-prefix", default="feature_")
    columns.add_argument("--features", type=_names, help="explicit feature columns (comma-separated)")

    method = parser.add_argument_group("method")
    method.add_argument("--tvn-batch", choices=("experiment", "plate"), default="experiment")
    method.add_argument("--tvn-shrinkage", type=number(float, minimum=0, maximum=1), default=0.5)
    method.add_argument("--tvn", choices=TVN_VARIANTS, default="batchwise",
                        help="batchwise: centre-scale per batch after the PCA (default); efaar1.0: EFAAR 1.0 as "
                             "published (centre-scale on all controls, batch only for the covariance alignment)")
    method.add_argument("--tails", type=_floats, default=(5.0,),
                        help="recall thresholds, percent per side (default 5: bottom 5%% or top 5%%)")
    method.add_argument("--curve-tails", type=_floats, default=EvalConfig().curve_tails)
    method.add_argument("--arm-min-genes", type=number(int, minimum=1), default=3, help="fewer reference genes: arm left uncorrected")
    method.add_argument("--expression-threshold", type=number(float), default=1.0,
                        help="numeric expression below this counts as unexpressed")
    method.add_argument("--min-replicates", type=number(int, minimum=1), default=1)
    method.add_argument("--strict-replicates", action="store_true",
                        help="error (instead of a reported skip) for perturbations below --min-replicates")
    method.add_argument("--seed", type=number(int, minimum=0), default=0,
                        help="random baseline (first) seed, bootstrap and mAP nulls")
    method.add_argument("--random-seeds", type=number(int, minimum=1), default=5,
                        help="random baseline: mean (± sd) over N seeds")
    method.add_argument("--bootstrap", type=number(int, minimum=0), default=1000,
                        help="bootstrap resamples for recall intervals")
    method.add_argument("--no-map", action="store_true", help="skip JUMP's mAP (activity, consistency)")
    method.add_argument("--map-null-size", type=number(int, minimum=1), default=1000,
                        help="null draws per mAP configuration")

    plots = parser.add_argument_group("plots")
    plots.add_argument("--heatmap", help="relationship NAME or file for the heat map (default: the first one)")
    plots.add_argument("--no-heatmap", action="store_true")
    plots.add_argument("--heatmap-max-genes", type=number(int, minimum=2), default=200)


def _config(args) -> EvalConfig:
    columns = ColumnSpec(
        perturbation=args.perturbation_column,
        batch=None if args.batch_column.lower() == "none" else args.batch_column,
        plate=args.plate_column,
        control_values=tuple(args.control_values),
        control_column=args.control_column,
        feature_prefix=args.feature_prefix,
        feature_columns=tuple(args.features) if args.features else None,
    )
    return EvalConfig(
        columns=columns, tvn_batch_level=args.tvn_batch, tvn_shrinkage=args.tvn_shrinkage,
        arm_min_genes=args.arm_min_genes, arm_expression_threshold=args.expression_threshold,
        min_replicates=args.min_replicates, strict_replicates=args.strict_replicates,
        tails=tuple(args.tails), curve_tails=tuple(args.curve_tails), seed=args.seed, pixel_channels=args.channels,
        tvn_variant=args.tvn, random_seeds=args.random_seeds, bootstrap_resamples=args.bootstrap,
        map_metrics=not args.no_map, map_null_size=args.map_null_size,
    )


def _gene_classes(path: str | None, gene_column: str):
    """gene -> class from a table with columns `gene` (or the perturbation column) and `class`."""
    if path is None:
        return None
    frame, where = load_table(path, gene_column)
    gene = gene_column if gene_column in frame.columns else "gene"
    require_columns(frame, [gene, "class"], where, "gene-classes table")
    return dict(zip(frame[gene].astype(str), frame["class"].astype(str)))


def _notes(result) -> list[str]:
    """What was skipped or left out, so that nothing is lost silently (one line per distinct note)."""
    notes = []
    per_source: dict[str, list[str]] = {}                      # note text -> sources it applies to
    for db, info in result.relationships.items():
        dropped = info["self_pairs"] + info["duplicate_pairs"] + info["empty_rows"]
        if dropped:
            notes.append(f"{db}: {info['self_pairs']} self-pairs, {info['duplicate_pairs']} duplicates, "
                         f"{info['empty_rows']} empty rows dropped; {info['unique_pairs']} unique pairs")
    for name, source in result.sources.items():
        found = []
        for db, r in source.databases.items():
            if r.genes_absent:
                found.append(f"{db}: {r.genes_absent} of {r.genes_in_file} genes absent from the map "
                             f"({', '.join(r.absent_examples[:5])}...); {r.pairs_dropped} pairs left out")
        report = source.report
        reps = report["replicates"]
        if reps["perturbations_below_min_replicates"] or reps["perturbations_without_wells"]:
            found.append(f"{reps['perturbations_below_min_replicates']} perturbation(s) below "
                         f"{reps['min_replicates']} replicate(s) and {reps['perturbations_without_wells']} without "
                         f"wells left out ({', '.join(reps['perturbations_below_min_replicates_examples'][:5])})")
        if report["rows_without_perturbation_skipped"]:
            found.append(f"{report['rows_without_perturbation_skipped']} row(s) without a perturbation skipped")
        arm = report.get("arm_correction")
        if arm and (arm["arms_left_uncorrected"] or arm["genes_without_arm"]):
            found.append(f"arms left uncorrected (< {arm['min_reference_genes']} reference genes): "
                         f"{arm['arms_left_uncorrected']}; genes without an arm: {arm['genes_without_arm']}")
        for text in found:
            per_source.setdefault(text, []).append(name)
    notes += [f"{', '.join(names)}: {text}" for text, names in per_source.items()]
    return notes


def run(args) -> int:
    config = _config(args)  # errors: the CLI's one handler (mae_fast.cli.common.run_command)
    with OutputLock(folder_lock_path(args.out), f"evaluation folder {args.out}"):
        remove_temporaries(args.out)  # of a killed evaluation; this one holds the folder's lock
        return _evaluate(args, config)


def _evaluate(args, config) -> int:
    relationships = parse_relationship_args(args.relationships)
    extra_paths = {}
    computed = {}
    for baseline, given, compute, flag in (("pixel-stats", args.pixel_stats, pixel_statistics_table, "--pixel-stats"),
                                          ("cellprofiler", args.cellprofiler, cellprofiler_table, "--cellprofiler")):
        computed[baseline] = given
        if baseline in args.baselines and given is None:
            if args.images_root is None:
                raise EvaluationInputError(f"--baselines {baseline} needs --images-root or {flag}")
            table = compute(args.images_root, channels=args.channels)
            os.makedirs(args.out, exist_ok=True)
            key = baseline.replace("-", "_")
            extra_paths[key] = os.path.join(args.out, f"{key}.parquet")
            atomic_write(extra_paths[key], lambda tmp, table=table: table.to_parquet(tmp, index=False))
            computed[baseline] = table
    result = evaluate(
        args.embeddings, relationships, arms=args.arms, config=config, baselines=args.baselines,
        pixel_stats=computed["pixel-stats"], cellprofiler=computed["cellprofiler"],
        gene_classes=_gene_classes(args.gene_classes, args.perturbation_column),
    )
    heatmap = None if args.no_heatmap else (args.heatmap or next(iter(relationships)))
    paths = write_outputs(result, args.out, heatmap_relationships=heatmap,
                          max_heatmap_genes=args.heatmap_max_genes)
    print(result.markdown())
    for note in _notes(result):
        print(f"note: {note}")
    for kind, path in {**paths, **extra_paths}.items():
        print(f"{kind}: {path}")
    return 0
