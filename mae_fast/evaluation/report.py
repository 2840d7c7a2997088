"""Outputs of an evaluation: JSON, Markdown table, recall-vs-percentile plot and a similarity heat map."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd

from mae_fast.io import atomic_write

from .result import EvaluationResult, PerturbationMap, config_as_dict, markdown_table
from .recall import RelationshipSet, load_relationships, unit_rows


def _number(x):
    """JSON has no NaN: write null."""
    return None if isinstance(x, float) and math.isnan(x) else x


def _interval(interval: dict) -> dict:
    return {f"{t:g}": [_number(lo), _number(hi)] for t, (lo, hi) in interval.items()}


def _spread(spread: dict) -> dict:
    return {k: _number(v) for k, v in spread.items()}


def result_as_dict(result: EvaluationResult) -> dict:
    sources = {}
    for name, s in result.sources.items():
        sources[name] = {
            "perturbations": s.n_perturbations,
            "null_pairs": s.n_null_pairs,
            "seconds": round(s.seconds, 3),
            "seeds": s.seeds,
            "thresholds": {f"{t:g}": {"lower": lo, "upper": hi} for t, (lo, hi) in s.thresholds.items()},
            "activity": {"mean_map": _number(s.activity_map), "fraction_retrieved": _number(s.activity_retrieved),
                         "groups": s.activity.n_groups if s.activity is not None else 0},
            "sd_over_seeds": _spread(s.spread),
            "databases": {
                db: {
                    "pairs": r.n_pairs,
                    "recall": {f"{t:g}": _number(v) for t, v in r.recall.items()},
                    "recall_interval": _interval(r.interval),
                    "curve": {f"{t:g}": _number(v) for t, v in r.curve.items()},
                    "consistency": {"mean_map": _number(r.consistency_map),
                                    "fraction_retrieved": _number(r.consistency_retrieved),
                                    "queries": r.consistency.n_groups if r.consistency is not None else 0},
                    "per_class": {
                        cls: {"pairs": c.n_pairs, "recall": {f"{t:g}": _number(v) for t, v in c.recall.items()},
                              "recall_interval": _interval(c.interval),
                              "consistency_map": _number(c.consistency_map),
                              "consistency_retrieved": _number(c.consistency_retrieved),
                              "sd_over_seeds": _spread(c.spread)}
                        for cls, c in r.per_class.items()
                    },
                    "sd_over_seeds": _spread(r.spread),
                    "genes_in_file": r.genes_in_file,
                    "genes_absent_from_map": r.genes_absent,
                    "genes_absent_examples": r.absent_examples,
                    "pairs_dropped_absent_gene": r.pairs_dropped,
                }
                for db, r in s.databases.items()
            },
            "pipeline": s.report,
        }
    return {
        "metric": "recall of known relationships among the bottom/top tail of all pairwise cosine similarities",
        "headline_tail_percent": result.config.tails[0],
        "interval": f"{result.config.interval:g}% percentile bootstrap over pairs, "
                    f"{result.config.bootstrap_resamples} resamples",
        "map": "JUMP mean average precision (copairs definitions): activity = replicate wells vs negative-control "
               "wells; consistency = each gene's known partners vs all other perturbations; retrieved = "
               f"BH-corrected p < {result.config.map_threshold:g} (null size {result.config.map_null_size})",
        "sources": sources,
        "block_choice": result.block_choice,
        "relationships": result.relationships,
        "config": config_as_dict(result.config),
    }


def write_json(result: EvaluationResult, path: str) -> str:
    text = json.dumps(result_as_dict(result), indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, write)
    return path


def write_markdown(result: EvaluationResult, path: str) -> str:
    text = "\n".join(markdown_table(result, t) for t in result.config.tails)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curve(result: EvaluationResult, path: str) -> str:
    """One panel per database: recall vs tail percentile per source, with the chance line 2t/100; the headline
    threshold's bootstrap interval as an error bar (random: the seed means of its curve and interval bounds)."""
    plt = _pyplot()
    databases = result.databases
    fig, axes = plt.subplots(1, len(databases), figsize=(4.2 * len(databases), 3.6), squeeze=False)
    tails = np.asarray(result.config.curve_tails, dtype=float)
    for ax, db in zip(axes[0], databases):
        for name, source in result.sources.items():
            record = source.databases[db]
            curve = record.curve
            line, = ax.plot(tails, [curve[t] for t in result.config.curve_tails], marker="o", ms=3, label=name)
            for t, (low, high) in record.interval.items():
                value = record.recall[t]
                if not (math.isnan(low) or math.isnan(value)):
                    ax.errorbar([t], [value], yerr=[[value - low], [high - value]], color=line.get_color(),
                                capsize=3, lw=1)
        ax.plot(tails, 2 * tails / 100, ls="--", color="grey", lw=1, label="chance")
        ax.set_title(f"{db} (n={next(iter(result.sources.values())).databases[db].n_pairs})")
        ax.set_xlabel("similarity percentile (bottom t% and top t%)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def connected_components(first: np.ndarray, second: np.ndarray, n: int) -> np.ndarray:
    """Component label (the smallest member index) of each of n nodes, by vectorised min-label propagation."""
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[first], labels[second])
        new = labels.copy()
        np.minimum.at(new, first, low)
        np.minimum.at(new, second, low)
        new = new[new]                      # pointer jumping: converge in O(log diameter) rounds
        if np.array_equal(new, labels):
            return labels
        labels = new


def heatmap_order(pmap: PerturbationMap, relationships: RelationshipSet, max_genes: int = 200):
    """Genes of the relationship set present in the map, grouped by connected component (largest first).

    Returns (map indices (k,), component sizes in order). Components that do not fit in `max_genes` are left out.
    """
    in_map = pmap.index_of(relationships.genes)
    first, second = in_map[relationships.first], in_map[relationships.second]
    present = (first >= 0) & (second >= 0)
    first, second = first[present], second[present]
    genes, local = np.unique(np.concatenate([first, second]), return_inverse=True)   # map rows, pair ends -> 0..k
    labels = connected_components(local[: first.size], local[first.size:], len(genes))
    components = pd.Series(np.arange(len(genes))).groupby(labels).apply(list).tolist()
    components.sort(key=lambda members: (-len(members), str(pmap.names[genes[members[0]]])))
    order, sizes = [], []
    for members in components:
        if len(order) + len(members) > max_genes:
            continue
        members = sorted(members, key=lambda m: str(pmap.names[genes[m]]))
        order.extend(genes[members].tolist())
        sizes.append(len(members))
    return np.asarray(order, dtype=np.int64), sizes


def plot_similarity_heatmap(result: EvaluationResult, relationships, path: str, max_genes: int = 200) -> str:
    """Cosine similarity among the genes of `relationships` (e.g. the planted complexes), one panel per source,
    genes ordered by connected component with the component blocks outlined."""
    plt = _pyplot()
    rel = relationships if isinstance(relationships, RelationshipSet) else load_relationships(relationships)
    names = list(result.maps)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names) + 1.0, 4.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, name in zip(axes[0], names):
        pmap = result.maps[name]
        order, sizes = heatmap_order(pmap, rel, max_genes)
        unit = pmap.unit[order]
        sims = unit_rows(unit) @ unit_rows(unit).T if len(order) else np.zeros((0, 0))
        image = ax.imshow(sims, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        edge = -0.5
        for size in sizes:
            ax.add_patch(plt.Rectangle((edge, edge), size, size, fill=False, lw=0.8, ec="black"))
            edge += size
        ax.set_title(f"{name}: {len(order)} genes, {len(sizes)} groups")
        if len(order) <= 60:
            labels = [str(g) for g in pmap.names[order]]
            ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=5)
            ax.set_yticks(range(len(order)), labels, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    fig.suptitle(f"{rel.name}: similarity of related genes")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_outputs(result: EvaluationResult, out_dir: str, heatmap_relationships=None, max_heatmap_genes: int = 200) -> dict:
    """evaluation.json, recall.md, recall_curve.png and (given a relationship file/name) similarity_heatmap.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": write_json(result, os.path.join(out_dir, "evaluation.json")),
        "markdown": write_markdown(result, os.path.join(out_dir, "recall.md")),
        "curve": plot_recall_curve(result, os.path.join(out_dir, "recall_curve.png")),
    }
    if heatmap_relationships is not None:
        if isinstance(heatmap_relationships, str) and heatmap_relationships in result.relationship_sets:
            heatmap_relationships = result.relationship_sets[heatmap_relationships]
        paths["heatmap"] = plot_similarity_heatmap(
            result, heatmap_relationships, os.path.join(out_dir, "similarity_heatmap.png"), max_heatmap_genes
        )
    return paths
