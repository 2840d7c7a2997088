"""Chromosome-arm correction and spherical-mean aggregation of replicate wells per perturbation."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .table import EvaluationInputError, load_table, name_some, require_columns


def group_means(features: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean row per group. features (N, D) float32, codes (N,) in [0, n_groups) -> ((n_groups, D) float32, counts)."""
    sums = torch.zeros((n_groups, features.shape[1]), dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    counts = np.bincount(codes, minlength=n_groups)
    means = sums.numpy() / np.maximum(counts, 1)[:, None].astype(np.float32)
    return means, counts


# --------------------------------------------------------------------------- chromosome-arm correction

@dataclass
class ArmTable:
    """gene -> chromosome arm, and which genes form each arm's reference (its unexpressed genes, or all)."""

    frame: pd.DataFrame      # columns gene, arm, reference (bool); one row per gene
    reference_rule: str      # how `reference` was chosen, for the report
    n_duplicate_rows: int = 0


def _expressed_flags(values: pd.Series, column: str, threshold: float, source: str) -> tuple[np.ndarray, str]:
    """(G,) bool 'is expressed' from a boolean column or a numeric expression level (expressed if >= threshold)."""
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=bool), f"unexpressed genes ({column} is false)"
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        text = values.astype(str).str.strip().str.lower()
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        unknown = ~text.isin(list(truth))
        if unknown.any():
            rows = np.flatnonzero(unknown.to_numpy())
            raise EvaluationInputError(
                f"{source}: column {column!r} must be boolean or numeric; rows {name_some(rows)} hold "
                f"{name_some(values.iloc[rows[:5]].tolist())}"
            )
        return text.map(truth).to_numpy(dtype=bool), f"unexpressed genes ({column} is false)"
    if pd.api.types.is_numeric_dtype(values):
        if values.isna().any():
            rows = np.flatnonzero(values.isna().to_numpy())
            raise EvaluationInputError(f"{source}: column {column!r} is empty in rows {name_some(rows)}")
        numbers = values.to_numpy(dtype=np.float64)
        if column == "expressed" and set(np.unique(numbers)) <= {0.0, 1.0}:
            return numbers == 1.0, f"unexpressed genes ({column} is 0)"
        return numbers >= threshold, f"unexpressed genes ({column} < {threshold:g})"
    raise EvaluationInputError(f"{source}: column {column!r} must be boolean or numeric, found {values.dtype}")


def load_arm_table(
    source,
    gene_column: str = "gene",
    arm_column: str = "chromosome_arm",
    expression_column: str | None = "auto",
    expression_threshold: float = 1.0,
) -> ArmTable:
    """Read a gene -> arm table (CSV/parquet or DataFrame).

    `expression_column="auto"` uses a column named `expressed` (boolean) or `expression` (numeric, unexpressed
    when below `expression_threshold`, e.g. TPM < 1) if present; without one every gene of an arm is a reference
    gene. A gene listed twice with different arms is an error naming it.
    """
    frame, name = load_table(source, perturbation_column=gene_column)
    if not isinstance(source, pd.DataFrame):
        name = os.fspath(source)
    require_columns(frame, [gene_column, arm_column], name, "arm table")
    if expression_column == "auto":
        expression_column = next((c for c in ("expressed", "expression") if c in frame.columns), None)
    elif expression_column is not None:
        require_columns(frame, [expression_column], name, "arm table")

    empty = (frame[gene_column].isna() | frame[arm_column].isna()).to_numpy()
    if empty.any():
        raise EvaluationInputError(f"{name}: empty gene or arm in rows {name_some(np.flatnonzero(empty))}")
    genes = frame[gene_column].astype(str)
    arms = frame[arm_column].astype(str)
    if expression_column is None:
        expressed = np.zeros(len(frame), dtype=bool)
        rule = "all genes of the arm (no expression column)"
    else:
        expressed, rule = _expressed_flags(frame[expression_column], expression_column, expression_threshold, name)
    table = pd.DataFrame({"gene": genes.to_numpy(), "arm": arms.to_numpy(), "reference": ~expressed})

    conflicting = table.groupby("gene")["arm"].nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise EvaluationInputError(f"{name}: gene(s) {name_some(conflicting.index)} are listed on more than one arm")
    n_before = len(table)
    # A gene listed twice on one arm counts as unexpressed only if every listing says so.
    table = table.groupby("gene", sort=True).agg(arm=("arm", "first"), reference=("reference", "all")).reset_index()
    return ArmTable(frame=table, reference_rule=rule, n_duplicate_rows=n_before - len(table))


@dataclass
class ArmCorrectionReport:
    reference_rule: str
    min_genes: int
    arms_corrected: dict[str, int] = field(default_factory=dict)   # arm -> reference genes averaged
    arms_skipped: dict[str, int] = field(default_factory=dict)     # arm -> reference genes (< min_genes)
    genes_without_arm: int = 0
    genes_without_arm_examples: list[str] = field(default_factory=list)
    wells_corrected: int = 0

    def as_dict(self) -> dict:
        return {
            "reference": self.reference_rule,
            "min_reference_genes": self.min_genes,
            "arms_corrected": self.arms_corrected,
            "arms_left_uncorrected": self.arms_skipped,
            "genes_without_arm": self.genes_without_arm,
            "genes_without_arm_examples": self.genes_without_arm_examples,
            "wells_corrected": self.wells_corrected,
        }


def chromosome_arm_correction(
    features: np.ndarray,
    perturbation: np.ndarray,
    is_control: np.ndarray,
    arms: ArmTable,
    min_genes: int = 3,
) -> tuple[np.ndarray, ArmCorrectionReport]:
    """Subtract, per chromosome arm, the mean embedding of that arm's reference genes from all its genes' wells.

    The arm's shift is measured from the negative controls (reference mean minus controls' mean), so reference
    genes end up, on average, where the controls are; after TVN the controls' mean is 0 and this is exactly
    "subtract the reference mean". Each reference gene counts once (the mean of its wells first). Arms with fewer
    than `min_genes` reference genes among the screened genes are left as they are and reported; genes missing
    from the arm table are left as they are and counted. Controls are never changed. (N, D) -> (N, D) float32.
    """
    report = ArmCorrectionReport(reference_rule=arms.reference_rule, min_genes=min_genes)
    treated = np.flatnonzero(~is_control)
    gene_codes, genes = pd.factorize(perturbation[treated], sort=True)
    gene_means, _ = group_means(features[treated], gene_codes, len(genes))        # (G, D)

    lookup = arms.frame.set_index("gene")
    gene_arm = lookup["arm"].reindex(genes.astype(str))
    is_reference = lookup["reference"].reindex(genes.astype(str), fill_value=False).to_numpy(dtype=bool)
    missing = gene_arm.isna().to_numpy()
    report.genes_without_arm = int(missing.sum())
    report.genes_without_arm_examples = [str(g) for g in genes[missing][:10]]

    arm_codes, arm_names = pd.factorize(gene_arm.to_numpy(), sort=True)           # -1 for genes without an arm
    reference = is_reference & (arm_codes >= 0)
    arm_means, n_reference = group_means(gene_means[reference], arm_codes[reference], len(arm_names))
    arm_shifts = arm_means - features[is_control].astype(np.float64).mean(axis=0).astype(np.float32)

    out = features.copy()
    row_arm = np.full(len(features), -1, dtype=np.int64)
    row_arm[treated] = arm_codes[gene_codes]
    for a, arm in enumerate(arm_names):
        if n_reference[a] < min_genes:
            report.arms_skipped[str(arm)] = int(n_reference[a])
            continue
        rows = np.flatnonzero(row_arm == a)
        out[rows] -= arm_shifts[a]
        report.arms_corrected[str(arm)] = int(n_reference[a])
        report.wells_corrected += int(rows.size)
    return out, report


# --------------------------------------------------------------------------- spherical mean

@dataclass
class PerturbationMeans:
    names: np.ndarray        # (P,) object, sorted
    means: np.ndarray        # (P, D) float32 spherical means (not re-normalised)
    replicates: np.ndarray   # (P,) wells per perturbation
    origin: np.ndarray       # (D,) float32 mean of the negative controls


def spherical_mean(
    features: np.ndarray, perturbation: np.ndarray, is_control: np.ndarray, describe_rows=None
) -> PerturbationMeans:
    """Per perturbation: mean of its unit-normalised wells, with the origin at the negative controls' mean.

    Controls are not perturbations of the map. A well sitting exactly at the origin has no direction: error
    naming the row (`describe_rows(index) -> str` names rows for the message).
    """
    origin = features[is_control].astype(np.float64).mean(axis=0).astype(np.float32)
    treated = np.flatnonzero(~is_control)
    if treated.size == 0:
        raise EvaluationInputError("no perturbation wells besides the negative controls")
    # torch: one multithreaded pass per step and no float64 temporaries over the (n_t, D) block
    centred = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[torch.from_numpy(treated)]
    centred -= torch.from_numpy(origin)                                            # (n_t, D)
    norms = torch.linalg.vector_norm(centred, dim=1).numpy()
    flat = norms <= np.finfo(np.float32).tiny
    if flat.any():
        where = describe_rows(treated[flat]) if describe_rows else name_some(treated[flat])
        raise EvaluationInputError(f"well(s) at the negative-control mean have no direction: {where}")
    centred /= torch.from_numpy(norms)[:, None]
    codes, names = pd.factorize(perturbation[treated], sort=True)
    means, counts = group_means(centred.numpy(), codes, len(names))
    return PerturbationMeans(names=np.asarray(names, dtype=object), means=means, replicates=counts, origin=origin)
