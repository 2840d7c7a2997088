"""Cosine similarities between perturbations, exact null percentiles, relationship files and recall.

The null is every pairwise cosine similarity between distinct perturbations (P(P-1)/2 values: ~145M for the
17,063 genes of RxRx3). Similarities are computed once, in float32, by blockwise matmul into the upper triangle of
a (P, P) array (the lower triangle is never computed or read). Percentiles of the null are exact order statistics
of those float32 values, found without sorting or copying the null:

    pass 1  map every value to one of 65,536 bins with a monotone function (float32 (x - lo) * scale, truncated)
            and count the bins;
    pass 2  recompute the same bin of every value and keep only the values of the few bins that hold a wanted
            rank; sort those and read the ranks off.

Because the binning is monotone, all values of a bin sit together in sorted order, so the cumulative bin counts
give each wanted rank's bin and its offset inside the bin exactly: the result equals np.partition's, and the
percentile interpolation repeats numpy's "linear" method operation for operation, so
`PairwiseSimilarities.percentiles(q)` returns exactly np.percentile(null_float32, q) for a list q (tested on small
data, also with 16 bins and tiny chunks). Cost: two passes over the null (~4 s for 145M values on 2 cores) and no
copy of it; similarity-matrix memory is P^2 x 4 bytes (1.2 GB for P = 17,063).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from mae_fast.data.errors import reading_table

from .table import EvaluationInputError, name_some

BINS = 65536
COSINE_RANGE = (-1.0625, 1.0625)  # cosines are within [-1, 1] up to float32 rounding; values outside still count


# --------------------------------------------------------------------------- exact order statistics

def _bin_index(chunk: np.ndarray, lo: np.float32, scale: np.float32, bins: int) -> np.ndarray:
    """Monotone non-decreasing bin of every value: trunc((x - lo) * scale) in float32, clipped to [0, bins)."""
    index = ((chunk - lo) * scale).astype(np.intp)
    np.clip(index, 0, bins - 1, out=index)
    return index


def order_statistics(chunks, ranks, value_range=COSINE_RANGE, bins: int = BINS) -> np.ndarray:
    """Values at 0-based `ranks` of the sorted union of all chunks, exactly, in two streaming passes.

    chunks: a callable returning a fresh iterable of float32 arrays (called twice, must yield the same values).
    Memory: one chunk's bin indices plus the values of the wanted bins.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    lo = np.float32(value_range[0])
    scale = np.float32(bins / (value_range[1] - value_range[0]))
    counts = np.zeros(bins, dtype=np.int64)
    for chunk in chunks():
        counts += np.bincount(_bin_index(chunk, lo, scale, bins).ravel(), minlength=bins)
    cumulative = np.cumsum(counts)                                   # values in bins <= b
    total = int(cumulative[-1])
    if ranks.size and (ranks.min() < 0 or ranks.max() >= total):
        raise ValueError(f"ranks must lie in [0, {total}), got {ranks.min()}..{ranks.max()}")
    rank_bin = np.searchsorted(cumulative, ranks, side="right")      # the bin holding each rank
    wanted = np.zeros(bins, dtype=bool)
    wanted[rank_bin] = True

    kept = []
    for chunk in chunks():
        keep = wanted[_bin_index(chunk, lo, scale, bins)]
        if keep.any():
            kept.append(chunk[keep])
    values = np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.float32)
    kept_counts = np.where(wanted, counts, 0)
    kept_before = np.cumsum(kept_counts) - kept_counts               # kept values in wanted bins before b
    first_rank = cumulative - counts                                 # global rank of the first value of bin b
    return values[kept_before[rank_bin] + ranks - first_rank[rank_bin]]


def _numpy_linear_positions(n: int, percentiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's 'linear' percentile method: (previous rank, next rank, weight) per percentile."""
    q = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (n - 1) * q                                            # numpy's expression for 'linear'
    previous = np.clip(np.floor(virtual), 0, n - 1)
    nxt = np.clip(previous + 1, 0, n - 1)
    previous = np.where(virtual >= n - 1, n - 1, previous)
    gamma = virtual - previous
    return previous.astype(np.int64), nxt.astype(np.int64), gamma


def _numpy_lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's interpolation between neighbours, with the same operations and dtypes (a, b float32, t float64)."""
    diff = b - a
    out = a + diff * t
    return np.where(t >= 0.5, b - diff * (1 - t), out)


def exact_percentiles(chunks, n_values: int, percentiles, value_range=COSINE_RANGE, bins: int = BINS) -> np.ndarray:
    """np.percentile(all values, percentiles) (method 'linear') without concatenating the chunks. -> float64."""
    if n_values < 1:
        raise EvaluationInputError("percentiles of an empty null distribution (need at least 2 perturbations)")
    previous, nxt, gamma = _numpy_linear_positions(n_values, percentiles)
    wanted = np.unique(np.concatenate([previous, nxt]))
    values = order_statistics(chunks, wanted, value_range, bins)
    lookup = dict(zip(wanted.tolist(), values))
    a = np.array([lookup[r] for r in previous.tolist()], dtype=values.dtype)
    b = np.array([lookup[r] for r in nxt.tolist()], dtype=values.dtype)
    return np.asarray(_numpy_lerp(a, b, gamma), dtype=np.float64)


# --------------------------------------------------------------------------- cosine similarities

def unit_rows(vectors: np.ndarray, names=None) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row has no direction: error naming it."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    flat = np.flatnonzero(norms <= np.finfo(np.float32).tiny)
    if flat.size:
        which = name_some(np.asarray(names, dtype=object)[flat]) if names is not None else name_some(flat)
        raise EvaluationInputError(f"perturbation(s) with a zero mean embedding (no direction): {which}")
    return (vectors / norms[:, None]).astype(np.float32)


class PairwiseSimilarities:
    """Cosine similarities between P unit vectors, upper triangle only, float32.

    `values[i, j]` is valid for j >= i. ~P^2 * 4 bytes (1.2 GB for P = 17,063), half of it touched.
    """

    def __init__(self, unit: np.ndarray, block_rows: int = 1024):
        unit = np.ascontiguousarray(unit, dtype=np.float32)
        self.n = unit.shape[0]
        self.values = np.empty((self.n, self.n), dtype=np.float32)
        matrix = torch.from_numpy(unit)
        for r0 in range(0, self.n, block_rows):
            r1 = min(self.n, r0 + block_rows)
            # rows r0:r1 against columns r0: (the blocks left of the diagonal are never needed)
            block = matrix[r0:r1] @ matrix[r0:].T                      # (r1 - r0, n - r0)
            self.values[r0:r1, r0:] = block.numpy()

        self._lower_filled = False

    @property
    def n_pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    def full_rows(self, index, block_rows: int = 1024) -> np.ndarray:
        """Complete rows (similarities to all n, self included) of the perturbations `index`. The first call
        mirrors the upper triangle into the lower one in place (no extra memory; the null still reads only the
        upper triangle)."""
        if not self._lower_filled:
            for r0 in range(0, self.n, block_rows):
                r1 = min(self.n, r0 + block_rows)
                self.values[r1:, r0:r1] = self.values[r0:r1, r1:].T
                square = self.values[r0:r1, r0:r1]
                lower = np.tril_indices(r1 - r0, k=-1)
                square[lower] = square.T[lower]
            self._lower_filled = True
        return self.values[np.asarray(index)]

    def pair_values(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Similarities of pairs (i, j), i != j, read from the upper triangle."""
        i, j = np.asarray(i), np.asarray(j)
        return self.values[np.minimum(i, j), np.maximum(i, j)]

    def strict_upper_chunks(self, target_elements: int = 1 << 23):
        """Iterate the null: the strict upper triangle in row blocks, each split into its triangle and rectangle."""
        rows = max(1, target_elements // max(self.n, 1))
        for r0 in range(0, self.n - 1, rows):
            r1 = min(self.n, r0 + rows)
            square = self.values[r0:r1, r0:r1]
            yield square[np.triu_indices(r1 - r0, k=1)]
            if r1 < self.n:
                yield self.values[r0:r1, r1:]

    def percentiles(self, percentiles, bins: int = BINS) -> np.ndarray:
        """Exact np.percentile of the null (all distinct pairs) at `percentiles` (0..100). -> float64."""
        return exact_percentiles(self.strict_upper_chunks, self.n_pairs, percentiles, COSINE_RANGE, bins)


# --------------------------------------------------------------------------- relationship files

@dataclass
class RelationshipSet:
    """Known pairs from one database as codes into `genes`: genes[first] < genes[second], no self-pairs, unique."""

    name: str
    source: str
    genes: np.ndarray          # (G,) sorted names of the genes in at least one kept pair (object)
    first: np.ndarray          # (K,) int64
    second: np.ndarray         # (K,) int64
    n_rows: int
    n_empty_rows: int
    n_self_pairs: int
    n_duplicate_pairs: int

    @property
    def pairs(self) -> pd.DataFrame:
        return pd.DataFrame({"entity1": self.genes[self.first], "entity2": self.genes[self.second]})

    def as_dict(self) -> dict:
        return {
            "source": self.source, "rows": self.n_rows, "empty_rows": self.n_empty_rows,
            "self_pairs": self.n_self_pairs, "duplicate_pairs": self.n_duplicate_pairs,
            "unique_pairs": int(self.first.size), "genes": int(self.genes.size),
        }


def relationship_name(source) -> str:
    base = os.path.basename(os.fspath(source))
    for suffix in (".gz", ".csv", ".tsv", ".parquet"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    return base


def load_relationships(source, name: str | None = None) -> RelationshipSet:
    """Read an EFAAR-format relationship file (CSV header `entity1,entity2`; extra columns are ignored).

    Each pair is sorted, self-pairs and duplicates are dropped (and counted), rows with an empty entity are
    skipped (and counted). Gene symbols are kept as text ("NA" is a gene, not a missing value).
    """
    if isinstance(source, pd.DataFrame):
        frame, where = source, f"<DataFrame {name or 'relationships'}>"
        name = name or "relationships"
    else:
        where = os.fspath(source)
        if not os.path.exists(where):
            raise EvaluationInputError(f"relationship file not found: {where}")
        name = name or relationship_name(where)
        sep = "\t" if ".tsv" in where.lower() else ","
        with reading_table(where, "relationship file", EvaluationInputError):
            frame = pd.read_csv(where, sep=sep, dtype=str, keep_default_na=False)
    if "entity1" not in frame.columns or "entity2" not in frame.columns:
        raise EvaluationInputError(
            f"{where}: relationship file must have the header entity1,entity2; found "
            f"{','.join(map(str, frame.columns)) or '(no columns)'}"
        )
    entities = []
    for column in ("entity1", "entity2"):
        values = frame[column]
        missing = values.isna().to_numpy()
        entities.append((np.where(missing, "", values.astype(str).str.strip().to_numpy(dtype=object)), missing))
    (first, missing1), (second, missing2) = entities
    empty = missing1 | missing2 | (first == "") | (second == "")
    n_kept = int((~empty).sum())
    # Codes in sorted-name order, so that sorting a pair and comparing pairs are integer operations.
    codes, names = pd.factorize(np.concatenate([first[~empty], second[~empty]]), sort=True)
    low = np.minimum(codes[:n_kept], codes[n_kept:])
    high = np.maximum(codes[:n_kept], codes[n_kept:])
    self_pair = low == high
    keys = np.unique(low[~self_pair].astype(np.int64) * max(len(names), 1) + high[~self_pair])
    low, high = keys // max(len(names), 1), keys % max(len(names), 1)
    used, inverse = np.unique(np.concatenate([low, high]), return_inverse=True)
    return RelationshipSet(
        name=name, source=where, genes=np.asarray(names, dtype=object)[used],
        first=inverse[: keys.size].astype(np.int64), second=inverse[keys.size:].astype(np.int64),
        n_rows=int(len(frame)), n_empty_rows=int(empty.sum()), n_self_pairs=int(self_pair.sum()),
        n_duplicate_pairs=int((~self_pair).sum() - keys.size),
    )


@dataclass
class PairMatch:
    """Known pairs whose two genes are both in the perturbation map, as row indices into it."""

    first: np.ndarray
    second: np.ndarray
    genes_in_file: int
    genes_absent: int
    absent_examples: list[str] = field(default_factory=list)
    pairs_dropped: int = 0    # pairs with at least one absent gene

    @property
    def n_pairs(self) -> int:
        return int(self.first.size)


def match_pairs(relationships: RelationshipSet, names) -> PairMatch:
    """Map pairs onto `names` (the perturbations of the map); pairs with an absent gene are counted and dropped."""
    in_map = pd.Index(np.asarray(names, dtype=object)).get_indexer(relationships.genes)   # (G,) -1 when absent
    first, second = in_map[relationships.first], in_map[relationships.second]
    present = (first >= 0) & (second >= 0)
    absent = relationships.genes[in_map < 0]
    return PairMatch(
        first=first[present], second=second[present], genes_in_file=int(relationships.genes.size),
        genes_absent=int(absent.size), absent_examples=[str(g) for g in absent[:10]],
        pairs_dropped=int((~present).sum()),
    )


def recall(pair_similarities: np.ndarray, lower: float, upper: float) -> float:
    """Fraction of known pairs with similarity <= lower or >= upper (NaN when there are no pairs)."""
    if pair_similarities.size == 0:
        return float("nan")
    hits = (pair_similarities <= lower) | (pair_similarities >= upper)
    return float(hits.mean())
