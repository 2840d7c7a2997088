"""`evaluate`: embeddings -> TVN -> chromosome-arm correction -> spherical means -> recall of known relationships
(with bootstrap intervals, per phenotype class) and JUMP's mAP (activity, consistency), for the model and, through
exactly the same steps, for the random (several seeds), pixel-statistics and CellProfiler-style baselines."""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from .aggregate import ArmTable, chromosome_arm_correction, load_arm_table, spherical_mean
from .average_precision import (
    activity_average_precision, consistency_average_precision_many, mean_average_precision,
)
from .cellprofiler import cellprofiler_table
from .null_models import pixel_statistics_table, random_embeddings_like
from .recall import (
    PairwiseSimilarities, RelationshipSet, load_relationships, match_pairs, recall, unit_rows,
)
from .result import (
    BASELINES, ClassRecall, DatabaseRecall, EvalConfig, EvaluationResult, PerturbationMap, SourceResult,
)
from .blocks import choose_block, source_tables
from .table import EvaluationInputError, WellTable, load_table, name_some, well_table_from_frame
from .tvn import fit_tvn


# --------------------------------------------------------------------------- one source

def _apply_replicate_rule(table: WellTable, config: EvalConfig) -> tuple[WellTable, dict]:
    """Leave out (and report) perturbations with fewer than `min_replicates` wells, or raise when strict."""
    treated = table.perturbation[~table.is_control]
    names, counts = np.unique(treated.astype(str), return_counts=True)
    few = names[counts < config.min_replicates].tolist()
    empty = list(table.empty_perturbations)
    report = {
        "perturbations_without_wells": len(empty), "perturbations_without_wells_examples": empty[:10],
        "perturbations_below_min_replicates": len(few), "perturbations_below_min_replicates_examples": few[:10],
        "min_replicates": config.min_replicates,
    }
    if (few or empty) and config.strict_replicates:
        raise EvaluationInputError(
            f"{table.source}: perturbation(s) with fewer than {config.min_replicates} replicate well(s): "
            f"{name_some(empty + few)}"
        )
    if few:
        keep = table.is_control | ~np.isin(table.perturbation.astype(str), few)
        table = WellTable(
            source=table.source, features=table.features[keep], perturbation=table.perturbation[keep],
            is_control=table.is_control[keep], batch_codes=table.batch_codes[keep], batch_names=table.batch_names,
            feature_columns=table.feature_columns, row_positions=table.row_positions[keep],
            row_ids=None if table.row_ids is None else table.row_ids[keep],
            empty_perturbations=table.empty_perturbations,
            n_rows_without_perturbation=table.n_rows_without_perturbation,
        )
    return table, report


def build_perturbation_map(table: WellTable, config: EvalConfig, arms: ArmTable | None = None) -> PerturbationMap:
    """TVN -> (arm correction) -> spherical mean with the origin at the controls' mean -> unit vectors."""
    seconds = {}
    cpu_seconds = {}     # process CPU time (all threads): comparable across runs on a shared, loaded machine
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(stage):
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), time.process_time()
        seconds[stage] = round(now - clock, 4)
        cpu_seconds[stage] = round(cpu_now - cpu_clock, 4)
        clock, cpu_clock = now, cpu_now

    table, replicate_report = _apply_replicate_rule(table, config)
    transform = fit_tvn(table.features, table.batch_codes, table.is_control, table.batch_names, config.tvn_shrinkage,
                        variant=config.tvn_variant)
    lap("tvn_fit")
    features = transform.apply(table.features, table.batch_codes)
    lap("tvn_apply")
    report = {
        "wells": table.n_wells, "controls": int(table.is_control.sum()), "dims": table.dims,
        "rows_without_perturbation_skipped": table.n_rows_without_perturbation,
        "tvn": transform.summary(), "replicates": replicate_report,
    }
    if arms is not None:
        features, arm_report = chromosome_arm_correction(
            features, table.perturbation, table.is_control, arms, config.arm_min_genes
        )
        report["arm_correction"] = arm_report.as_dict()
        lap("arm_correction")
    activity = None
    if config.map_metrics:
        ap = activity_average_precision(features, table.perturbation, table.is_control)
        activity = mean_average_precision(ap, "perturbation", "activity", config.map_null_size,
                                          config.map_threshold, config.seed)
        lap("map_activity")
    means = spherical_mean(features, table.perturbation, table.is_control, table.describe_rows)
    del features
    unit = unit_rows(means.means, means.names)
    lap("spherical_mean")
    report["perturbations"] = int(len(means.names))
    report["seconds"] = seconds
    report["cpu_seconds"] = cpu_seconds
    return PerturbationMap(names=means.names, unit=unit, replicates=means.replicates, report=report,
                           activity=activity)


def bootstrap_interval(hits: np.ndarray, resamples: int, coverage: float, rng: np.random.Generator):
    """Percentile bootstrap interval of a recall (mean of 0/1 hits) over pairs, resampled with replacement.

    The number of hits in a resample of n pairs drawn with replacement is Binomial(n, k/n) (each draw is a hit
    with probability k/n, independently), so the resampled recalls are drawn as that directly: the same
    distribution as resampling the pairs, in O(resamples) instead of O(resamples x n). NaN when n = 0."""
    n = int(hits.size)
    if n == 0:
        return float("nan"), float("nan")
    draws = rng.binomial(n, float(hits.mean()), size=resamples) / n
    tail = (100.0 - coverage) / 2
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def pair_classes(first: np.ndarray, second: np.ndarray, gene_class: np.ndarray) -> np.ndarray:
    """Class of each pair: the class of both genes, "mixed" (different classes) or "unclassified"."""
    a, b = gene_class[first], gene_class[second]
    classified = (a != "") & (b != "")
    return np.where(classified & (a == b), a, np.where(classified, "mixed", "unclassified")).astype(object)


def _class_of_map_genes(pmap: PerturbationMap, gene_classes) -> np.ndarray | None:
    if gene_classes is None:
        return None
    lookup = pd.Series(gene_classes, dtype=object) if not isinstance(gene_classes, pd.Series) else gene_classes
    lookup.index = lookup.index.astype(str)
    return lookup.reindex(pd.Index(pmap.names).astype(str)).fillna("").astype(str).to_numpy(dtype=object)


def evaluate_map(pmap: PerturbationMap, relationship_sets: list[RelationshipSet], config: EvalConfig,
                 name: str = "model", gene_classes=None) -> tuple[SourceResult, PairwiseSimilarities]:
    """Null percentiles, recall (with bootstrap intervals, per class when `gene_classes` maps gene -> class) and
    consistency mAP of every relationship set for one perturbation map."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if len(pmap.names) < 2:
        raise EvaluationInputError(f"{name}: recall needs at least 2 perturbations, the map has {len(pmap.names)}")
    similarities = PairwiseSimilarities(pmap.unit)
    seconds = {"similarities": round(time.perf_counter() - start, 4)}
    tails = config.all_tails()
    percentile_points = [t for t in tails] + [100.0 - t for t in tails]
    values = similarities.percentiles(percentile_points)
    seconds["null_percentiles"] = round(time.perf_counter() - start - seconds["similarities"], 4)
    thresholds = {t: (float(values[k]), float(values[k + len(tails)])) for k, t in enumerate(tails)}
    map_classes = _class_of_map_genes(pmap, gene_classes)
    databases = {}
    matches = [match_pairs(rel, pmap.names) for rel in relationship_sets]
    consistency_ap = [None] * len(matches)
    clock, cpu_clock = time.perf_counter(), time.process_time()
    cpu_seconds = {"similarities_and_percentiles": round(cpu_clock - cpu_start, 4)}
    if config.map_metrics:
        with_pairs = [k for k, m in enumerate(matches) if m.n_pairs]
        computed = consistency_average_precision_many(
            similarities.full_rows, len(pmap.names), [(matches[k].first, matches[k].second) for k in with_pairs])
        for k, ap in zip(with_pairs, computed):
            consistency_ap[k] = ap
    consistency_seconds = time.perf_counter() - clock
    cpu_seconds["map_consistency_ap"] = round(time.process_time() - cpu_clock, 4)
    for db_index, (rel, match) in enumerate(zip(relationship_sets, matches)):
        sims = similarities.pair_values(match.first, match.second)
        hits = {t: (sims <= thresholds[t][0]) | (sims >= thresholds[t][1]) for t in config.tails}
        by_tail = {t: recall(sims, *thresholds[t]) for t in tails}
        rng = np.random.default_rng([config.seed, db_index])
        record = DatabaseRecall(
            database=rel.name, n_pairs=match.n_pairs, genes_in_file=match.genes_in_file,
            genes_absent=match.genes_absent, absent_examples=match.absent_examples, pairs_dropped=match.pairs_dropped,
            recall={t: by_tail[t] for t in config.tails}, curve={t: by_tail[t] for t in config.curve_tails},
            interval={t: bootstrap_interval(hits[t], config.bootstrap_resamples, config.interval, rng)
                      for t in config.tails},
        )
        queries = None
        if consistency_ap[db_index] is not None:
            clock = time.perf_counter()
            record.consistency = mean_average_precision(consistency_ap[db_index], "query", "consistency",
                                                        config.map_null_size, config.map_threshold, config.seed)
            record.consistency_map = record.consistency.mean_map
            record.consistency_retrieved = record.consistency.fraction_retrieved
            queries = record.consistency.groups
            consistency_seconds += time.perf_counter() - clock
        if map_classes is not None:
            classes = pair_classes(match.first, match.second, map_classes)
            for c_index, cls in enumerate(sorted(set(classes.tolist()))):
                mine = classes == cls
                c_rng = np.random.default_rng([config.seed, db_index, c_index + 1])
                entry = ClassRecall(
                    n_pairs=int(mine.sum()),
                    recall={t: float(hits[t][mine].mean()) for t in config.tails},
                    interval={t: bootstrap_interval(hits[t][mine], config.bootstrap_resamples, config.interval, c_rng)
                              for t in config.tails},
                )
                if queries is not None and cls not in ("mixed", "unclassified"):
                    of_class = queries[map_classes[queries["group"].to_numpy(dtype=np.int64)] == cls]
                    if len(of_class):
                        entry.consistency_map = float(of_class["mean_average_precision"].mean())
                        entry.consistency_retrieved = float(of_class["retrieved"].mean())
                record.per_class[str(cls)] = entry
        if record.consistency is not None:               # query rows -> gene names, for reports
            record.consistency.groups["group"] = pmap.names[record.consistency.groups["group"].to_numpy(np.int64)]
        databases[rel.name] = record
    seconds["map_consistency"] = round(consistency_seconds, 4)
    seconds["recall"] = round(time.perf_counter() - start - sum(seconds.values()), 4)
    cpu_seconds["evaluate_map_total"] = round(time.process_time() - cpu_start, 4)
    report = {**pmap.report, "seconds": {**pmap.report.get("seconds", {}), **seconds},
              "cpu_seconds": {**pmap.report.get("cpu_seconds", {}), **cpu_seconds}}
    result = SourceResult(
        name=name, n_perturbations=int(len(pmap.names)), n_null_pairs=similarities.n_pairs,
        thresholds={t: thresholds[t] for t in tails}, databases=databases, report=report,
        seconds=time.perf_counter() - start, activity=pmap.activity,
        activity_map=pmap.activity.mean_map if pmap.activity is not None else float("nan"),
        activity_retrieved=pmap.activity.fraction_retrieved if pmap.activity is not None else float("nan"),
    )
    return result, similarities


def _mean_and_sd(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).all():
        return float("nan"), float("nan")
    return float(np.nanmean(array)), float(np.nanstd(array, ddof=1)) if array.size > 1 else 0.0


def combine_seeds(results: list[SourceResult]) -> SourceResult:
    """One result whose numbers are the means over several random seeds (sd in `spread`); bootstrap intervals
    are the means of the per-seed bounds; the first seed's mAP tables and report are kept."""
    first = results[0]
    if len(results) == 1:
        return first

    def set_mean(target, getter, key, setter):
        mean, sd = _mean_and_sd([getter(r) for r in results])
        setter(target, mean)
        target.spread[key] = sd

    combined = SourceResult(
        name=first.name, n_perturbations=first.n_perturbations, n_null_pairs=first.n_null_pairs,
        thresholds=first.thresholds, databases={}, report={**first.report, "random_seeds": len(results)},
        seconds=sum(r.seconds for r in results), activity=first.activity, seeds=len(results),
    )
    set_mean(combined, lambda r: r.activity_map, "activity_map", lambda t, v: setattr(t, "activity_map", v))
    set_mean(combined, lambda r: r.activity_retrieved, "activity_retrieved",
             lambda t, v: setattr(t, "activity_retrieved", v))
    for db, base in first.databases.items():
        rows = [r.databases[db] for r in results]
        record = DatabaseRecall(
            database=db, n_pairs=base.n_pairs, genes_in_file=base.genes_in_file, genes_absent=base.genes_absent,
            absent_examples=base.absent_examples, pairs_dropped=base.pairs_dropped, recall={}, curve={},
            consistency=base.consistency,
        )
        for t in base.curve:
            record.curve[t] = _mean_and_sd([r.curve[t] for r in rows])[0]
        for t in base.recall:
            set_mean(record, lambda r, t=t: r.databases[db].recall[t], f"recall@{t:g}",
                     lambda x, v, t=t: x.recall.__setitem__(t, v))
            record.interval[t] = tuple(float(np.mean([r.interval[t][k] for r in rows])) for k in (0, 1))
        for key in ("consistency_map", "consistency_retrieved"):
            set_mean(record, lambda r, key=key: getattr(r.databases[db], key), key,
                     lambda x, v, key=key: setattr(x, key, v))
        for cls, base_cls in base.per_class.items():
            entry = ClassRecall(n_pairs=base_cls.n_pairs, recall={}, interval={})
            for t in base_cls.recall:
                set_mean(entry, lambda r, t=t: r.databases[db].per_class[cls].recall[t], f"recall@{t:g}",
                         lambda x, v, t=t: x.recall.__setitem__(t, v))
                entry.interval[t] = tuple(
                    float(np.mean([r.databases[db].per_class[cls].interval[t][k] for r in results])) for k in (0, 1))
            for key in ("consistency_map", "consistency_retrieved"):
                set_mean(entry, lambda r, key=key: getattr(r.databases[db].per_class[cls], key), key,
                         lambda x, v, key=key: setattr(x, key, v))
            record.per_class[cls] = entry
        combined.databases[db] = record
    return combined


# --------------------------------------------------------------------------- everything

def _relationship_sets(relationships) -> list[RelationshipSet]:
    if isinstance(relationships, (str, os.PathLike, RelationshipSet, pd.DataFrame)):
        relationships = [relationships]
    if isinstance(relationships, dict):
        items = list(relationships.items())
    else:
        items = [(None, r) for r in relationships]
    sets = []
    for name, source in items:
        rel = source if isinstance(source, RelationshipSet) else load_relationships(source, name)
        sets.append(rel)
    names = [r.name for r in sets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise EvaluationInputError(f"two relationship files share the name(s) {name_some(duplicated)}; pass a dict")
    if not sets:
        raise EvaluationInputError("no relationship files given")
    return sets


def _as_well_table(source, config: EvalConfig, name: str) -> WellTable:
    if isinstance(source, WellTable):
        return source
    frame, where = load_table(source, config.columns.perturbation)
    return well_table_from_frame(frame, config.columns, where if where != "<DataFrame>" else name, config.tvn_batch_level)


def evaluate(
    embeddings,
    relationships,
    *,
    arms=None,
    config: EvalConfig | None = None,
    baselines=(),
    pixel_stats=None,
    cellprofiler=None,
    images_root: str | None = None,
    gene_classes=None,
    name: str = "model",
    keep_similarities: bool = False,
) -> EvaluationResult:
    """Recall (with bootstrap intervals) and mAP of known relationships for `embeddings` and the baselines.

    embeddings: path (parquet/CSV), DataFrame or WellTable, one row per well; a table with a `block` column
        (`mae-fast embed --blocks`) is one source per block, "NAME block B", and `result.block_choice` names the
        block to headline, chosen by phenotypic activity mAP (no relationships used; `choose_block`).
    relationships: path(s), RelationshipSet(s) or {name: path/DataFrame/RelationshipSet} in EFAAR format
        (entity1,entity2); `mae_fast.evaluation.databases.efaar_relationships()` gives EFAAR's five.
    arms: gene -> chromosome arm table (path, DataFrame or ArmTable) or None for no arm correction.
    baselines: any of "random" (same shape, standard normal, seeds config.seed .. + config.random_seeds - 1,
        reported as the mean over seeds), "pixel-stats" (a per-well table: `pixel_stats`, or computed from the
        RxRx3 layout at `images_root`) and "cellprofiler" (a per-well table: `cellprofiler`, or computed from
        `images_root` with `mae_fast.evaluation.cellprofiler.cellprofiler_table`).
    gene_classes: optional {gene: phenotype class} (dict or Series): recall and consistency per class.
    Perturbation maps are kept in `result.maps` (and similarities in `result.similarities` if asked) for plots.
    """
    config = config or EvalConfig()
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise EvaluationInputError(f"unknown baseline(s) {name_some(unknown)}; choose from {', '.join(BASELINES)}")
    relationships_start = time.perf_counter()
    relationship_sets = _relationship_sets(relationships)
    relationship_seconds = time.perf_counter() - relationships_start
    arm_table = None
    if arms is not None:
        arm_table = arms if isinstance(arms, ArmTable) else load_arm_table(
            arms, gene_column=config.columns.perturbation, expression_threshold=config.arm_expression_threshold
        )

    load_start = time.perf_counter()
    model_tables = source_tables(embeddings, config, name)
    load_seconds = time.perf_counter() - load_start
    model_table = list(model_tables.values())[-1]  # the random baseline's shape (every block's is the same)
    # each source: the tables of its seeds (one, except for the random baseline)
    sources: dict[str, list] = {source: [table] for source, table in model_tables.items()}
    if "random" in baselines:
        sources["random"] = [lambda s=s: random_embeddings_like(model_table, config.seed + s)
                             for s in range(config.random_seeds)]
    for baseline, table, compute in (("pixel-stats", pixel_stats, pixel_statistics_table),
                                     ("cellprofiler", cellprofiler, cellprofiler_table)):
        if baseline not in baselines:
            continue
        if table is None:
            if images_root is None:
                raise EvaluationInputError(f"the {baseline} baseline needs a per-well table or `images_root`")
            table = compute(images_root, channels=config.pixel_channels)
        sources[baseline] = [_as_well_table(table, config, baseline)]

    result = EvaluationResult(
        sources={}, relationships={r.name: r.as_dict() for r in relationship_sets}, config=config,
        relationship_sets={r.name: r for r in relationship_sets},
    )
    for source_name, tables in sources.items():
        seed_results = []
        for k, table in enumerate(tables):
            start = time.perf_counter()
            table = table() if callable(table) else table
            pmap = build_perturbation_map(table, config, arm_table)
            source_result, similarities = evaluate_map(pmap, relationship_sets, config, source_name, gene_classes)
            source_result.seconds = time.perf_counter() - start
            if k == 0:
                result.maps[source_name] = pmap
                if keep_similarities:
                    result.similarities[source_name] = similarities
            del similarities, table
            seed_results.append(source_result)
        source_result = combine_seeds(seed_results)
        if source_name in model_tables:
            source_result.report["seconds"]["load_table"] = round(load_seconds, 4)
            source_result.report["seconds"]["load_relationships"] = round(relationship_seconds, 4)
        result.sources[source_name] = source_result
    result.block_choice = choose_block(result, name)
    return result
