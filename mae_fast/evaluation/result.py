"""The evaluation's configuration and results: `EvalConfig`, the per-source / per-database / per-class results and
`EvaluationResult` with its table views (`table()`, `recall_table()`, `markdown()`). Computed by `pipeline.py`, written
to files and plots by `report.py`."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .average_precision import MAPResult
from .recall import PairwiseSimilarities, RelationshipSet
from .table import ColumnSpec, EvaluationInputError
from .tvn import TVN_VARIANTS

BASELINES = ("random", "pixel-stats", "cellprofiler")


@dataclass
class EvalConfig:
    """How to evaluate. `tails`: recall thresholds as tail mass per side in percent (5 -> bottom 5% or top 5%
    of the null); the first one is the headline number. `curve_tails`: the recall-vs-percentile curve."""

    columns: ColumnSpec = field(default_factory=ColumnSpec)
    tvn_batch_level: str = "experiment"         # "experiment" or "plate"
    tvn_shrinkage: float = 0.5
    tvn_variant: str = "batchwise"              # or "efaar1.0" (see mae_fast.evaluation.tvn)
    arm_min_genes: int = 3
    arm_expression_threshold: float = 1.0
    min_replicates: int = 1                     # perturbations with fewer wells are left out and reported
    strict_replicates: bool = False             # ... or are an error
    tails: tuple[float, ...] = (5.0,)
    curve_tails: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0)
    seed: int = 0                               # random baseline (seeds seed .. seed + random_seeds - 1), bootstrap
    random_seeds: int = 5                       # the random baseline is reported as mean (and sd) over this many
    bootstrap_resamples: int = 1000             # percentile bootstrap over pairs for recall intervals
    interval: float = 95.0                      # interval coverage in percent
    map_metrics: bool = True                    # JUMP's mAP (activity, consistency) beside recall
    map_null_size: int = 1000
    map_threshold: float = 0.05                 # "retrieved": BH-corrected p below this
    pixel_channels: int = 6

    def __post_init__(self):
        for t in tuple(self.tails) + tuple(self.curve_tails):
            if not 0 < t < 50:
                raise EvaluationInputError(f"recall tails must be in (0, 50) percent per side, got {t}")
        if self.min_replicates < 1:
            raise EvaluationInputError(f"min_replicates must be >= 1, got {self.min_replicates}")
        if self.tvn_variant not in TVN_VARIANTS:
            raise EvaluationInputError(f"unknown TVN variant {self.tvn_variant!r}; choose from {', '.join(TVN_VARIANTS)}")
        if self.random_seeds < 1 or self.bootstrap_resamples < 1 or self.map_null_size < 1:
            raise EvaluationInputError("random_seeds, bootstrap_resamples and map_null_size must be >= 1")
        if not 0 < self.interval < 100:
            raise EvaluationInputError(f"interval must be in (0, 100) percent, got {self.interval}")

    def all_tails(self) -> list[float]:
        return sorted(set(self.tails) | set(self.curve_tails))


@dataclass
class PerturbationMap:
    """Unit-length spherical-mean embeddings, one per perturbation, plus what happened on the way."""

    names: np.ndarray          # (P,) sorted perturbation labels
    unit: np.ndarray           # (P, D) float32
    replicates: np.ndarray     # (P,)
    report: dict
    activity: MAPResult | None = None   # phenotypic activity of the wells (None when mAP is off)

    def index_of(self, genes) -> np.ndarray:
        return pd.Index(self.names).get_indexer(np.asarray(genes, dtype=object))


@dataclass
class ClassRecall:
    """Recall (and consistency mAP) restricted to one phenotype class: pairs whose two genes are in that class
    ("mixed": two classified genes of different classes; "unclassified": a gene without a class)."""

    n_pairs: int
    recall: dict[float, float]                       # headline tails -> recall
    interval: dict[float, tuple[float, float]]       # headline tails -> bootstrap interval
    consistency_map: float = float("nan")            # mean AP of the class's query genes
    consistency_retrieved: float = float("nan")      # fraction of them with corrected p < threshold
    spread: dict[str, float] = field(default_factory=dict)  # sd over random seeds, by field name


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
    interval: dict[float, tuple[float, float]] = field(default_factory=dict)   # headline tail -> (low, high)
    per_class: dict[str, ClassRecall] = field(default_factory=dict)
    consistency: MAPResult | None = None             # per query gene (the first seed's, for random)
    consistency_map: float = float("nan")            # mean AP over query genes
    consistency_retrieved: float = float("nan")      # fraction of query genes with corrected p < threshold
    spread: dict[str, float] = field(default_factory=dict)  # sd over random seeds, by field name ("recall@5", ...)


@dataclass
class SourceResult:
    name: str
    n_perturbations: int
    n_null_pairs: int
    thresholds: dict[float, tuple[float, float]]    # tail -> (lower, upper) similarity
    databases: dict[str, DatabaseRecall]
    report: dict
    seconds: float
    activity: MAPResult | None = None                # per perturbation (the first seed's, for random)
    activity_map: float = float("nan")               # mean mAP over perturbations with >= 2 wells
    activity_retrieved: float = float("nan")         # fraction of them with corrected p < threshold
    seeds: int = 1                                   # > 1: numbers are means over that many random seeds
    spread: dict[str, float] = field(default_factory=dict)   # sd over seeds, by field name


@dataclass
class EvaluationResult:
    sources: dict[str, SourceResult]
    relationships: dict[str, dict]
    config: EvalConfig
    relationship_sets: dict[str, RelationshipSet] = field(default_factory=dict, repr=False)
    maps: dict[str, PerturbationMap] = field(default_factory=dict, repr=False)
    similarities: dict[str, PairwiseSimilarities] = field(default_factory=dict, repr=False)
    block_choice: dict | None = None  # block-wise embeddings: the block to headline and why (`pipeline.choose_block`)

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

    def table(self, tail: float | None = None) -> pd.DataFrame:
        """Everything in one long table, one row per (source, database, phenotype_class); class "all" is the whole
        database, other classes appear when `gene_classes` was given. Columns:
            source, database, phenotype_class, n_pairs, recall, recall_low, recall_high (bootstrap interval at
            `config.interval`), seeds (> 1 for random: numbers are seed means), recall_sd (sd over seeds),
            activity_map, activity_retrieved (per source, repeated on every row of it; NaN on class rows),
            consistency_map, consistency_retrieved (mean AP over query genes, fraction with corrected p < threshold),
            activity_map_sd, consistency_map_sd (sd over seeds).
        `tail` defaults to the headline threshold."""
        tail = self.config.tails[0] if tail is None else tail
        nan = float("nan")
        rows = []
        for source in self.sources.values():
            for db, rec in source.databases.items():
                entries = [("all", rec)] + list(rec.per_class.items())
                for cls, entry in entries:
                    low, high = entry.interval.get(tail, (nan, nan))
                    overall = cls == "all"
                    rows.append({
                        "source": source.name, "database": db, "phenotype_class": cls, "n_pairs": entry.n_pairs,
                        "recall": entry.recall.get(tail, nan), "recall_low": low, "recall_high": high,
                        "seeds": source.seeds, "recall_sd": entry.spread.get(f"recall@{tail:g}", nan),
                        "activity_map": source.activity_map if overall else nan,
                        "activity_retrieved": source.activity_retrieved if overall else nan,
                        "consistency_map": entry.consistency_map,
                        "consistency_retrieved": entry.consistency_retrieved,
                        "activity_map_sd": source.spread.get("activity_map", nan) if overall else nan,
                        "consistency_map_sd": entry.spread.get("consistency_map", nan),
                    })
        return pd.DataFrame(rows)

    def markdown(self, tail: float | None = None) -> str:
        return markdown_table(self, tail)


def config_as_dict(config: EvalConfig) -> dict:
    out = asdict(config)
    out["columns"]["control_values"] = list(config.columns.control_values)
    return out


def _recall_cell(recall: float, interval: tuple, sd: float | None, seeds: int) -> str:
    if recall is None or (isinstance(recall, float) and math.isnan(recall)):
        return "n/a"
    text = f"{recall:.3f}"
    if seeds > 1 and sd is not None and not math.isnan(sd):
        text += f" ± {sd:.3f}"
    low, high = interval
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _map_cell(value: float, retrieved: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f} ({retrieved:.0%})"


def markdown_table(result: EvaluationResult, tail: float | None = None) -> str:
    """rows = sources (model, random, pixel-stats, cellprofiler), columns = databases: recall [bootstrap
    interval] (random: mean ± sd over seeds), pair counts in the header; then mAP (activity and consistency per
    database, fraction retrieved in brackets) and, when phenotype classes were given, recall per class."""
    tail = result.config.tails[0] if tail is None else tail
    nan = float("nan")
    databases = result.databases
    header = ["source"]
    for db in databases:
        counts = {s.databases[db].n_pairs for s in result.sources.values()}
        header.append(f"{db} (n={counts.pop()})" if len(counts) == 1 else db)
    seeds = max(s.seeds for s in result.sources.values())
    lines = [
        f"Recall of known relationships in the bottom {tail:g}% or top {tail:g}% of all pairwise cosine "
        f"similarities (chance: {2 * tail / 100:.2f}); [{result.config.interval:g}% bootstrap interval over pairs]"
        + (f"; random: mean ± sd over {seeds} seeds" if seeds > 1 else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, source in result.sources.items():
        cells = [_recall_cell(r.recall.get(tail, r.curve.get(tail, nan)), r.interval.get(tail, (nan, nan)),
                              r.spread.get(f"recall@{tail:g}"), source.seeds)
                 for r in (source.databases[db] for db in databases)]
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    if any(not math.isnan(s.activity_map) or any(not math.isnan(r.consistency_map) for r in s.databases.values())
           for s in result.sources.values()):
        lines += [
            "",
            f"mAP (JUMP): activity (replicate wells vs controls) and consistency (known partners vs all other "
            f"perturbations) per database; in brackets the fraction retrieved (BH-corrected p < "
            f"{result.config.map_threshold:g})",
            "",
            "| source | activity | " + " | ".join(f"consistency {db}" for db in databases) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(databases) + 1)) + "|",
        ]
        for name, source in result.sources.items():
            cells = [_map_cell(source.activity_map, source.activity_retrieved)]
            cells += [_map_cell(source.databases[db].consistency_map, source.databases[db].consistency_retrieved)
                      for db in databases]
            lines.append("| " + " | ".join([str(name)] + cells) + " |")
    classes = sorted({c for s in result.sources.values() for r in s.databases.values() for c in r.per_class})
    if classes:
        lines += ["", f"Recall per phenotype class (pairs with both genes in the class) at {tail:g}%", "",
                  "| source | database | " + " | ".join(classes) + " |",
                  "|" + "|".join(["---", "---"] + ["---:"] * len(classes)) + "|"]
        for name, source in result.sources.items():
            for db in databases:
                per_class = source.databases[db].per_class
                cells = []
                for cls in classes:
                    entry = per_class.get(cls)
                    cells.append("n/a" if entry is None else _recall_cell(
                        entry.recall.get(tail, nan), entry.interval.get(tail, (nan, nan)),
                        entry.spread.get(f"recall@{tail:g}"), source.seeds) + f" (n={entry.n_pairs})")
                lines.append("| " + " | ".join([str(name), db] + cells) + " |")
    if result.block_choice:
        lines += ["", block_choice_line(result.block_choice)]
    return "\n".join(lines) + "\n"


def block_choice_line(choice: dict) -> str:
    """One sentence: the block headlined, by what criterion, beside the last block."""
    scores = choice["activity_map"]
    def score(b):
        value = scores.get(str(b))
        return "n/a" if value is None else f"{value:.3f}"
    return (f"headline block: {choice['block']} of {choice['last_block']} (activity mAP {score(choice['block'])}; "
            f"last block {score(choice['last_block'])}), chosen by {choice['criterion']}")
