"""`evaluate`: embeddings -> TVN -> chromosome-arm correction -> spherical means -> recall of known relationships,
for the model and, through exactly the same steps, for the random and pixel-statistics baselines."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .aggregate import ArmTable, chromosome_arm_correction, load_arm_table, spherical_mean
from .baselines import pixel_statistics_table, random_embeddings_like
from .recall import (
    PairwiseSimilarities, RelationshipSet, load_relationships, match_pairs, recall, unit_rows,
)
from .table import ColumnSpec, EvaluationInputError, WellTable, load_table, name_some, well_table_from_frame
from .tvn import fit_tvn

BASELINES = ("random", "pixel-stats")


@dataclass
class EvalConfig:
    """How to evaluate. `tails`: recall thresholds as tail mass per side in percent (5 -> bottom 5% or top 5%
    of the null); the first one is the headline number. `curve_tails`: the recall-vs-percentile curve."""

    columns: ColumnSpec = field(default_factory=ColumnSpec)
    tvn_batch_level: str = "experiment"         # "experiment" or "plate"
    tvn_shrinkage: float = 0.5
    arm_min_genes: int = 3
    arm_expression_threshold: float = 1.0
    min_replicates: int = 1                     # perturbations with fewer wells are left out and reported
    strict_replicates: bool = False             # ... or are an error
    tails: tuple[float, ...] = (5.0,)
    curve_tails: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0)
    seed: int = 0                               # random baseline
    pixel_channels: int = 6

    def __post_init__(self):
        for t in tuple(self.tails) + tuple(self.curve_tails):
            if not 0 < t < 50:
                raise EvaluationInputError(f"recall tails must be in (0, 50) percent per side, got {t}")
        if self.min_replicates < 1:
            raise EvaluationInputError(f"min_replicates must be >= 1, got {self.min_replicates}")

    def all_tails(self) -> list[float]:
        return sorted(set(self.tails) | set(self.curve_tails))


@dataclass
class PerturbationMap:
    """Unit-length spherical-mean embeddings, one per perturbation, plus what happened on the way."""

    names: np.ndarray          # (P,) sorted perturbation labels
    unit: np.ndarray           # (P, D) float32
    replicates: np.ndarray     # (P,)
    report: dict

    def index_of(self, genes) -> np.ndarray:
        return pd.Index(self.names).get_indexer(np.asarray(genes, dtype=object))


@dataclass
class DatabaseRecall:
    database: str
    n_pairs: int                     # known pairs with both genes in the map
    genes_in_file: int
    genes_absent: int
    absent_examples: list[str]
    pairs_dropped: int
    recall: dict[float, float]       # tail -> recall
    curve: dict[float, float]        # tail -> recall


@dataclass
class SourceResult:
    name: str
    n_perturbations: int
    n_null_pairs: int
    thresholds: dict[float, tuple[float, float]]    # tail -> (lower, upper) similarity
    databases: dict[str, DatabaseRecall]
    report: dict
    seconds: float


@dataclass
class EvaluationResult:
    sources: dict[str, SourceResult]
    relationships: dict[str, dict]
    config: EvalConfig
    relationship_sets: dict[str, RelationshipSet] = field(default_factory=dict, repr=False)
    maps: dict[str, PerturbationMap] = field(default_factory=dict, repr=False)
    similarities: dict[str, PairwiseSimilarities] = field(default_factory=dict, repr=False)

    @property
    def databases(self) -> list[str]:
        return list(self.relationships)

    def recall_table(self, tail: float | None = None) -> pd.DataFrame:
        """rows = sources, columns = databases, recall at `tail` (default: the headline threshold)."""
        tail = self.config.tails[0] if tail is None else tail
        return pd.DataFrame(
            {db: [s.databases[db].recall.get(tail, s.databases[db].curve.get(tail)) for s in self.sources.values()]
             for db in self.databases},
            index=list(self.sources),
        )

    def markdown(self, tail: float | None = None) -> str:
        from .report import markdown_table

        return markdown_table(self, tail)


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
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 4)
        clock = now

    table, replicate_report = _apply_replicate_rule(table, config)
    transform = fit_tvn(table.features, table.batch_codes, table.is_control, table.batch_names, config.tvn_shrinkage)
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
    means = spherical_mean(features, table.perturbation, table.is_control, table.describe_rows)
    del features
    unit = unit_rows(means.means, means.names)
    lap("spherical_mean")
    report["perturbations"] = int(len(means.names))
    report["seconds"] = seconds
    return PerturbationMap(names=means.names, unit=unit, replicates=means.replicates, report=report)


def evaluate_map(pmap: PerturbationMap, relationship_sets: list[RelationshipSet], config: EvalConfig,
                 name: str = "model") -> tuple[SourceResult, PairwiseSimilarities]:
    """Null percentiles and recall of every relationship set for one perturbation map."""
    start = time.perf_counter()
    if len(pmap.names) < 2:
        raise EvaluationInputError(f"{name}: recall needs at least 2 perturbations, the map has {len(pmap.names)}")
    similarities = PairwiseSimilarities(pmap.unit)
    seconds = {"similarities": round(time.perf_counter() - start, 4)}
    tails = config.all_tails()
    percentile_points = [t for t in tails] + [100.0 - t for t in tails]
    values = similarities.percentiles(percentile_points)
    seconds["null_percentiles"] = round(time.perf_counter() - start - seconds["similarities"], 4)
    thresholds = {t: (float(values[k]), float(values[k + len(tails)])) for k, t in enumerate(tails)}
    databases = {}
    for rel in relationship_sets:
        match = match_pairs(rel, pmap.names)
        sims = similarities.pair_values(match.first, match.second)
        by_tail = {t: recall(sims, *thresholds[t]) for t in tails}
        databases[rel.name] = DatabaseRecall(
            database=rel.name, n_pairs=match.n_pairs, genes_in_file=match.genes_in_file,
            genes_absent=match.genes_absent, absent_examples=match.absent_examples, pairs_dropped=match.pairs_dropped,
            recall={t: by_tail[t] for t in config.tails}, curve={t: by_tail[t] for t in config.curve_tails},
        )
    seconds["recall"] = round(time.perf_counter() - start - sum(seconds.values()), 4)
    report = {**pmap.report, "seconds": {**pmap.report.get("seconds", {}), **seconds}}
    result = SourceResult(
        name=name, n_perturbations=int(len(pmap.names)), n_null_pairs=similarities.n_pairs,
        thresholds={t: thresholds[t] for t in tails}, databases=databases, report=report,
        seconds=time.perf_counter() - start,
    )
    return result, similarities


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
    images_root: str | None = None,
    name: str = "model",
    keep_similarities: bool = False,
) -> EvaluationResult:
    """Recall of known relationships for `embeddings` and the requested baselines.

    embeddings: path (parquet/CSV), DataFrame or WellTable, one row per well.
    relationships: path(s) or {name: path/DataFrame} in EFAAR format (entity1,entity2).
    arms: gene -> chromosome arm table (path, DataFrame or ArmTable) or None for no arm correction.
    baselines: any of "random" (same shape, standard normal, `config.seed`) and "pixel-stats" (a per-well
        pixel-statistics table: `pixel_stats` path/DataFrame, or computed from the RxRx3 layout at `images_root`).
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
    tables: dict[str, WellTable] = {name: _as_well_table(embeddings, config, name)}
    load_seconds = time.perf_counter() - load_start
    if "random" in baselines:
        tables["random"] = random_embeddings_like(tables[name], config.seed)
    if "pixel-stats" in baselines:
        if pixel_stats is None:
            if images_root is None:
                raise EvaluationInputError("the pixel-stats baseline needs `pixel_stats` (a table) or `images_root`")
            pixel_stats = pixel_statistics_table(images_root, channels=config.pixel_channels)
        tables["pixel-stats"] = _as_well_table(pixel_stats, config, "pixel-stats")

    result = EvaluationResult(
        sources={}, relationships={r.name: r.as_dict() for r in relationship_sets}, config=config,
        relationship_sets={r.name: r for r in relationship_sets},
    )
    for source_name, table in tables.items():
        start = time.perf_counter()
        pmap = build_perturbation_map(table, config, arm_table)
        source_result, similarities = evaluate_map(pmap, relationship_sets, config, source_name)
        source_result.seconds = time.perf_counter() - start
        if source_name == name:
            source_result.report["seconds"]["load_table"] = round(load_seconds, 4)
            source_result.report["seconds"]["load_relationships"] = round(relationship_seconds, 4)
        result.sources[source_name] = source_result
        result.maps[source_name] = pmap
        if keep_similarities:
            result.similarities[source_name] = similarities
        del similarities
    return result


def config_as_dict(config: EvalConfig) -> dict:
    out = asdict(config)
    out["columns"]["control_values"] = list(config.columns.control_values)
    return out
