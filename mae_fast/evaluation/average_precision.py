"""JUMP's mean average precision (mAP): phenotypic activity and phenotypic consistency, with p-values and FDR.

The definitions are those of the `copairs` package (Kalinin et al., JUMP Cell Painting); this module computes the
same numbers with dense, vectorised arithmetic so that a whole-genome map (17,063 perturbations, ~70,000 wells)
takes seconds: copairs enumerates every (query, negative) pair and draws each null by permuting a full-length
list, which at that scale takes minutes (measured: 0.9 s per distinct (positives, total) configuration with
null_size 1,000 and a list of 17,062, and a consistency evaluation has hundreds of configurations). The AP
values equal copairs.map.average_precision's and the null distributions are the same distribution as
copairs.compute.random_ap's (both tested against copairs when it is installed); copairs is not needed to run.

Average precision of one query profile q, with positives Pos(q) and negatives Neg(q) ranked by cosine similarity
(largest first; a positive tied with a negative ranks first, as in copairs):
    AP(q) = (1 / |Pos|) * sum_{k=1..|Pos|} k / r_k,   r_k = k + #{n in Neg : sim(q, n) > s_k}
where s_1 >= s_2 >= ... are the similarities of q to its positives.

Phenotypic activity (well level, after TVN): query = each treated well, positives = the other wells of the same
perturbation, negatives = all negative-control wells. mAP of a perturbation = mean AP over its wells (needs >= 2).
Phenotypic consistency (perturbation level, the spherical-mean map): query = each perturbation that has at least
one known partner in the database and in the map, positives = those partners, negatives = every other
perturbation of the map (the query excluded). One AP per query, so mAP = AP.

Significance, as copairs: a query's null is the AP of its (|Pos|, |Pos| + |Neg|) configuration under a uniformly
random ranking (`null_size` draws, seeded); a group's null is the draw-by-draw mean of its members' nulls;
p = (#{null > mAP} + 1) / (null_size + 1); p-values are corrected by Benjamini-Hochberg over the groups and a
group is "retrieved" when its corrected p < `threshold` (0.05). Reported: the mean mAP over groups and the
fraction retrieved.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .table import EvaluationInputError

SMALL_QUERY_COUNT = 8    # up to this many positives per query: direct comparisons, beyond it: sort + search


@dataclass
class MAPResult:
    """mAP of one kind ("activity" or "consistency") for one source (and one database for consistency)."""

    kind: str
    groups: pd.DataFrame     # one row per group: group, mean_average_precision, n_queries, p_value,
                             # corrected_p_value, retrieved
    null_size: int
    threshold: float

    @property
    def n_groups(self) -> int:
        return int(len(self.groups))

    @property
    def mean_map(self) -> float:
        return float(self.groups["mean_average_precision"].mean()) if len(self.groups) else float("nan")

    @property
    def n_retrieved(self) -> int:
        return int(self.groups["retrieved"].sum()) if len(self.groups) else 0

    @property
    def fraction_retrieved(self) -> float:
        return self.n_retrieved / self.n_groups if self.n_groups else float("nan")

    def summary(self) -> dict:
        return {"kind": self.kind, "mean_map": self.mean_map, "fraction_retrieved": self.fraction_retrieved,
                "groups": self.n_groups, "retrieved": self.n_retrieved, "null_size": self.null_size,
                "threshold": self.threshold}


# --------------------------------------------------------------------------- average precision

def count_greater(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(B, M) values and (B, K) queries -> (B, K) int64: how many values of each row are strictly greater than
    each of that row's queries (NaN queries count 0)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.shape[1] <= SMALL_QUERY_COUNT:
        out = np.empty(queries.shape, dtype=np.int64)
        for k in range(queries.shape[1]):
            out[:, k] = np.count_nonzero(rows > queries[:, k:k + 1], axis=1)
        return out
    ordered = torch.from_numpy(np.sort(rows, axis=1))
    probe = torch.from_numpy(np.where(np.isnan(queries), np.inf, queries))
    return rows.shape[1] - torch.searchsorted(ordered, probe, right=True).numpy().astype(np.int64)


def ap_from_counts(positives: np.ndarray, negatives_above: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """AP per row. positives (B, K) sorted descending, NaN padded; negatives_above (B, K) = #negatives with a
    larger similarity than each positive; valid (B, K) bool. -> (B,) float64 (NaN for rows without positives)."""
    k = np.cumsum(valid, axis=1)                                        # 1-based rank among the positives
    precision = np.where(valid, k / np.maximum(k + negatives_above, 1), 0.0)
    n_pos = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return precision.sum(axis=1) / n_pos


def _sorted_descending(values: np.ndarray) -> np.ndarray:
    """Rows sorted largest first, NaN (padding) last."""
    ordered = np.sort(np.where(np.isnan(values), np.inf, -values), axis=1)
    return np.where(np.isinf(ordered) & (ordered > 0), np.nan, -ordered)


def unit_or_nan(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity as a dot product); zero rows become NaN (no direction)."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, x / np.where(norms > 0, norms, 1), np.nan).astype(np.float32)


def activity_average_precision(features: np.ndarray, perturbation: np.ndarray, is_control: np.ndarray,
                               block_rows: int = 4096) -> pd.DataFrame:
    """Per treated well: AP of its replicate wells against all control wells (cosine). Perturbations with one
    well have no positives and are left out (copairs does the same). Columns: perturbation, well (row index),
    average_precision, n_pos_pairs, n_total_pairs."""
    unit = unit_or_nan(features)
    controls = torch.from_numpy(np.ascontiguousarray(unit[is_control]))
    treated = np.flatnonzero(~is_control)
    codes, names = pd.factorize(np.asarray(perturbation, dtype=object)[treated], sort=True)
    sizes = np.bincount(codes, minlength=len(names))
    frames = []
    for size in np.unique(sizes[sizes >= 2]):
        groups = np.flatnonzero(sizes == size)
        members = np.full((len(groups), size), -1, dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        members[:] = order[starts[groups][:, None] + np.arange(size)]       # positions into `treated`
        wells = treated[members]                                            # (G, r) rows of `features`
        x = torch.from_numpy(np.ascontiguousarray(unit[wells]))             # (G, r, D)
        within = torch.bmm(x, x.transpose(1, 2)).numpy()                    # (G, r, r)
        off_diagonal = ~np.eye(size, dtype=bool)
        positives = within[:, off_diagonal].reshape(len(groups) * size, size - 1)
        positives = _sorted_descending(positives)
        flat = x.reshape(-1, x.shape[-1])
        above = np.empty(positives.shape, dtype=np.int64)
        for r0 in range(0, flat.shape[0], block_rows):
            sims = (flat[r0:r0 + block_rows] @ controls.T).numpy()
            above[r0:r0 + block_rows] = count_greater(sims, positives[r0:r0 + block_rows])
        ap = ap_from_counts(positives, above, ~np.isnan(positives))
        frames.append(pd.DataFrame({
            "perturbation": np.repeat(np.asarray(names, dtype=object)[groups], size),
            "well": wells.ravel(), "average_precision": ap,
            "n_pos_pairs": size - 1, "n_total_pairs": size - 1 + controls.shape[0],
        }))
    if not frames:
        return pd.DataFrame(columns=["perturbation", "well", "average_precision", "n_pos_pairs", "n_total_pairs"])
    return pd.concat(frames, ignore_index=True)


def partner_lists(first: np.ndarray, second: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Known pairs (both orientations) grouped by query: (queries (Q,), offsets (Q + 1,), partners)."""
    a = np.concatenate([first, second]).astype(np.int64)
    b = np.concatenate([second, first]).astype(np.int64)
    keys = np.unique(a * n + b)
    a, b = keys // n, keys % n
    queries, starts = np.unique(a, return_index=True)
    return queries, np.append(starts, a.size), b


def consistency_average_precision(full_rows, n: int, first: np.ndarray, second: np.ndarray,
                                  block_rows: int = 1024) -> pd.DataFrame:
    """Per query perturbation: AP of its known partners against every other perturbation of the map.

    full_rows(index array) -> (B, n) float32 cosine similarities of those perturbations to all n (self included).
    Columns: query (map row), average_precision, n_pos_pairs, n_total_pairs.
    """
    return consistency_average_precision_many(full_rows, n, [(first, second)], block_rows)[0]


def consistency_average_precision_many(full_rows, n: int, pair_sets, block_rows: int = 1024) -> list[pd.DataFrame]:
    """`consistency_average_precision` for several relationship sets [(first, second), ...] in one pass: each
    block of query rows is read and sorted once for all sets (the sort is the main cost at genome scale)."""
    partner_sets = [partner_lists(first, second, n) for first, second in pair_sets]
    results = [np.full(queries.size, np.nan) for queries, _, _ in partner_sets]
    position = np.full((len(pair_sets), n), -1, dtype=np.int64)         # map row -> index into that set's queries
    for s, (queries, _, _) in enumerate(partner_sets):
        position[s, queries] = np.arange(queries.size)
    wanted = np.flatnonzero((position >= 0).any(axis=0))
    for r0 in range(0, wanted.size, block_rows):
        block = wanted[r0:r0 + block_rows]
        sims = np.array(full_rows(block), dtype=np.float32, copy=True)                  # (B, n)
        sims[np.arange(block.size), block] = -np.inf                                    # the query is not ranked
        ordered = torch.from_numpy(np.sort(sims, axis=1))
        for s, (queries, offsets, partners) in enumerate(partner_sets):
            local = np.flatnonzero(position[s, block] >= 0)                              # rows of `block`
            if local.size == 0:
                continue
            where = position[s, block[local]]
            counts = offsets[where + 1] - offsets[where]
            # one row per row of the block (NaN rows for genes that are no query of this set): the sorted block is
            # searched as it is, without gathering a copy of its query rows
            positives = np.full((block.size, int(counts.max())), np.nan, dtype=np.float32)
            row_of = np.repeat(local, counts)
            column = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            mine = np.concatenate([partners[offsets[w]:offsets[w + 1]] for w in where])
            positives[row_of, column] = sims[row_of, mine]
            positives = _sorted_descending(positives)
            valid = ~np.isnan(positives)
            probe = torch.from_numpy(np.where(valid, positives, np.inf))
            above_all = n - torch.searchsorted(ordered, probe, right=True).numpy()
            above_positives = count_greater(np.where(valid, positives, -np.inf), positives)
            ap = ap_from_counts(positives, above_all.astype(np.int64) - above_positives, valid)
            results[s][where] = ap[local]
    return [pd.DataFrame({"query": queries, "average_precision": ap, "n_pos_pairs": np.diff(offsets),
                          "n_total_pairs": n - 1})
            for (queries, offsets, _), ap in zip(partner_sets, results)]


# --------------------------------------------------------------------------- null distributions and p-values

def uniform_subsets(k: int, total: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, k) sorted positions of k distinct items drawn uniformly from range(total), one draw per row.

    Each row is the first k distinct values of a stream of iid uniform draws: the stream's law is invariant under
    any relabelling of range(total), hence so is the set, so the set is uniform over k-subsets (rows whose m draws
    hold fewer than k distinct values are drawn again with a longer stream; that event is relabelling-invariant
    too). Cost O(size m log m), m ~ k + 2k^2/total, instead of O(size x total) for a full permutation. For
    k^2 <= 2 total, plain rejection of rows with a repeated value; for k > total / 2 the complement is drawn."""
    if not 0 < k <= total:
        raise EvaluationInputError(f"need 0 < positives <= total, got {k} of {total}")
    if 2 * k > total:
        if k == total:
            return np.tile(np.arange(total, dtype=np.int64), (size, 1))
        left_out = uniform_subsets(total - k, total, size, rng)
        keep = np.ones((size, total), dtype=bool)
        keep[np.arange(size)[:, None], left_out] = False
        return np.nonzero(keep)[1].reshape(size, k).astype(np.int64)
    out = np.empty((size, k), dtype=np.int64)
    todo = np.arange(size)
    if k * k <= 2 * total:
        # Few collisions: k iid draws, kept when all distinct (then uniform by the same argument; accepted with
        # probability ~exp(-k^2 / 2 total) >= 0.37).
        while todo.size:
            draws = np.sort(rng.integers(0, total, size=(todo.size, k)), axis=1)
            distinct = (draws[:, 1:] != draws[:, :-1]).all(axis=1)
            out[todo[distinct]] = draws[distinct]
            todo = todo[~distinct]
        return out
    m = k + int(np.ceil(2.0 * k * k / total)) + 16
    while todo.size:
        draws = rng.integers(0, total, size=(todo.size, m))
        keys = np.sort(draws * m + np.arange(m), axis=1)           # by value, then by draw position
        values, positions = keys // m, keys % m
        first = np.ones(keys.shape, dtype=bool)
        first[:, 1:] = values[:, 1:] != values[:, :-1]            # the earliest draw of each value
        earliest = np.sort(np.where(first, positions, m), axis=1)  # draw positions of new values, in order
        enough = earliest[:, k - 1] < m
        out[todo[enough]] = np.take_along_axis(draws[enough], earliest[enough, :k], axis=1)
        todo = todo[~enough]
        m *= 2
    out.sort(axis=1)
    return out


@functools.lru_cache(maxsize=4096)
def null_average_precision(k: int, total: int, size: int, seed: int) -> np.ndarray:
    """AP of k positives among `total` under a uniformly random ranking, `size` draws, seeded per configuration
    (so sources, seeds and databases share one cached null per configuration). -> (size,) float64, read-only."""
    rng = np.random.default_rng([seed, k, total])
    ranks = uniform_subsets(k, total, size, rng) + 1                                   # 1-based ranks
    null = (np.arange(1, k + 1) / ranks).mean(axis=1)
    null.flags.writeable = False
    return null


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (step-up, monotone, capped at 1); NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    if finite.size == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def mean_average_precision(ap: pd.DataFrame, group_column: str, kind: str, null_size: int = 1000,
                           threshold: float = 0.05, seed: int = 0) -> MAPResult:
    """Group APs into mAP with permutation p-values and BH correction (copairs's procedure, see module doc)."""
    if null_size < 1:
        raise EvaluationInputError(f"mAP null_size must be >= 1, got {null_size}")
    ap = ap[~ap["average_precision"].isna() & (ap["n_pos_pairs"] > 0)]
    columns = ["group", "mean_average_precision", "n_queries", "p_value", "corrected_p_value", "retrieved"]
    if ap.empty:
        return MAPResult(kind, pd.DataFrame(columns=columns), null_size, threshold)
    configs, config_of = np.unique(ap[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64), axis=0,
                                   return_inverse=True)
    nulls = np.stack([null_average_precision(int(k), int(t), null_size, seed) for k, t in configs])
    codes, groups = pd.factorize(ap[group_column], sort=True)
    scores = np.bincount(codes, weights=ap["average_precision"].to_numpy(np.float64)) / np.bincount(codes)
    # Group null = mean of its members' nulls; members of most groups share one configuration.
    members = pd.DataFrame({"group": codes, "config": config_of.ravel()})
    counts = members.value_counts().rename("n").reset_index()
    per_group: dict[tuple, list[int]] = {}
    for key, part in counts.groupby("group"):
        signature = tuple(zip(part["config"].tolist(), part["n"].tolist()))
        per_group.setdefault(signature, []).append(int(key))
    p_values = np.empty(len(groups))
    for signature, group_ids in per_group.items():
        weights = np.zeros(len(configs))
        for config, n in signature:
            weights[config] = n
        null = np.sort((weights / weights.sum()) @ nulls)
        above = null.size - np.searchsorted(null, scores[group_ids], side="right")
        p_values[group_ids] = (above + 1) / (null_size + 1)
    corrected = benjamini_hochberg(p_values)
    frame = pd.DataFrame({
        "group": np.asarray(groups, dtype=object), "mean_average_precision": scores,
        "n_queries": np.bincount(codes), "p_value": p_values, "corrected_p_value": corrected,
        "retrieved": corrected < threshold,
    })
    return MAPResult(kind, frame, null_size, threshold)
