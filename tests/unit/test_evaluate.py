"""Tests of mae_fast.evaluation: TVN, arm correction, spherical means, exact null percentiles, recall, baselines,
outputs, bad input and the `mae-fast evaluate` command. Small planted screens built here; runs in well under 60 s."""
from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from mae_fast.cli import evaluate as evaluate_cli
from mae_fast.cli.common import run_command
from mae_fast.evaluation import (
    ColumnSpec,
    EvalConfig,
    EvaluationInputError,
    PairwiseSimilarities,
    PerturbationMap,
    chromosome_arm_correction,
    evaluate,
    evaluate_map,
    exact_percentiles,
    fit_tvn,
    load_arm_table,
    load_relationships,
    markdown_table,
    pixel_feature_names,
    pixel_statistics,
    pixel_statistics_table,
    random_embeddings_like,
    spherical_mean,
    unit_rows,
    well_table_from_frame,
    write_outputs,
)
from mae_fast.evaluation.tvn import inverse_sqrt, whitening_factors
from mae_fast.evaluation.report import connected_components, heatmap_order


# --------------------------------------------------------------------------- a planted screen

def planted_screen(
    seed=0, n_batches=3, dims=24, n_complexes=6, complex_size=4, n_singletons=24, replicates=2,
    controls_per_batch=40, batch_offset=4.0, effect=1.5, arm_effect=0.0, n_arms=4, noise=1.0,
):
    """Wells of a CRISPR-like screen: complex members share a direction; every batch adds its own offset and
    per-feature gain; every chromosome arm adds a shift to its genes (unexpressed genes carry only that shift;
    complex members are always expressed)."""
    rng = np.random.default_rng(seed)
    n_members = n_complexes * complex_size
    complexes = [[f"CPX{k}_{j}" for j in range(complex_size)] for k in range(n_complexes)]
    genes = [g for c in complexes for g in c] + [f"SOLO{i:02d}" for i in range(n_singletons)]
    phenotype = {}
    for members in complexes:
        shared = effect * rng.standard_normal(dims)
        for g in members:
            phenotype[g] = shared + 0.3 * effect * rng.standard_normal(dims)
    for g in genes[n_members:]:
        phenotype[g] = effect * rng.standard_normal(dims)
    arms = [f"chr{a + 1}p" for a in range(n_arms)]
    arm_of = {g: arms[i] for g, i in zip(genes, rng.integers(0, n_arms, len(genes)))}
    # complex members are expressed; half of the singletons are not (they carry only their arm's shift)
    expressed = {g: k < n_members or bool(rng.random() < 0.5) for k, g in enumerate(genes)}
    arm_shift = {a: arm_effect * rng.standard_normal(dims) for a in arms}
    signal = {g: (phenotype[g] if expressed[g] else 0 * phenotype[g]) + arm_shift[arm_of[g]] for g in genes}

    rows, features = [], []
    for b in range(n_batches):
        offset = batch_offset * rng.standard_normal(dims)
        gain = np.exp(0.3 * rng.standard_normal(dims))
        wells = [g for g in genes for _ in range(replicates)] + ["EMPTY_control"] * controls_per_batch
        for w, gene in enumerate(wells):
            base = signal.get(gene, np.zeros(dims))
            features.append(gain * (base + noise * rng.standard_normal(dims)) + offset)
            rows.append({"well_id": f"E{b}_{w:04d}", "experiment_name": f"E{b}", "plate": 1 + w % 2, "gene": gene})
    frame = pd.DataFrame(rows)
    feature_frame = pd.DataFrame(np.asarray(features, dtype=np.float32), columns=[f"feature_{k}" for k in range(dims)])
    frame = pd.concat([frame, feature_frame], axis=1)
    pairs = pd.DataFrame([p for c in complexes for p in itertools.combinations(c, 2)], columns=["entity1", "entity2"])
    arm_table = pd.DataFrame({"gene": genes, "chromosome_arm": [arm_of[g] for g in genes],
                              "expressed": [expressed[g] for g in genes]})
    truth = {"arm_shift": arm_shift, "arm_of": arm_of, "expressed": expressed, "phenotype": phenotype}
    return frame, pairs, arm_table, truth


def features_of(frame):
    return frame[[c for c in frame.columns if c.startswith("feature_")]].to_numpy(np.float32)


# --------------------------------------------------------------------------- exact percentiles of the null

def test_pairwise_percentiles_equal_numpy():
    rng = np.random.default_rng(1)
    unit = unit_rows(rng.standard_normal((53, 7)).astype(np.float32))
    sims = PairwiseSimilarities(unit, block_rows=10)       # several blocks, odd sizes
    null = sims.values[np.triu_indices(53, k=1)]
    assert null.size == sims.n_pairs == 53 * 52 // 2
    q = [0.5, 1.0, 5.0, 10.0, 33.3, 50.0, 90.0, 95.0, 99.0, 100.0]
    expected = np.percentile(null, q)                        # array q: numpy interpolates in float64
    got = sims.percentiles(q)
    np.testing.assert_array_equal(got, expected)
    # coarse bins (many values per bin) and tiny chunks give the same exact answer
    coarse = exact_percentiles(lambda: sims.strict_upper_chunks(target_elements=60), sims.n_pairs, q, bins=16)
    np.testing.assert_array_equal(coarse, expected)


# --------------------------------------------------------------------------- recall

def test_recall_equals_brute_force_count():
    rng = np.random.default_rng(2)
    names = np.array([f"G{i:02d}" for i in range(41)], dtype=object)
    unit = unit_rows(rng.standard_normal((41, 9)).astype(np.float32))
    pmap = PerturbationMap(names=names, unit=unit, replicates=np.ones(41, int), report={})
    i, j = rng.integers(0, 41, 300), rng.integers(0, 41, 300)
    rel = pd.DataFrame({"entity1": names[i], "entity2": names[j]})
    rel = pd.concat([rel, pd.DataFrame({"entity1": ["G01", "ABSENT1"], "entity2": ["G01", "G02"]})])  # self, absent
    config = EvalConfig(tails=(5.0, 10.0), curve_tails=(1.0, 2.5, 5.0, 20.0))
    result, _ = evaluate_map(pmap, [load_relationships(rel, "db")], config)
    db = result.databases["db"]

    # brute force: float64 similarities, numpy percentiles, Python set of sorted unique non-self pairs
    s = unit.astype(np.float64) @ unit.astype(np.float64).T
    null = s[np.triu_indices(41, k=1)]
    pairs = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist()) if p[0] != p[1]}
    assert db.n_pairs == len(pairs)
    assert db.genes_absent == 1 and db.absent_examples == ["ABSENT1"] and db.pairs_dropped == 1
    for tail in (1.0, 2.5, 5.0, 10.0, 20.0):
        lo, hi = np.percentile(null, [tail, 100 - tail])
        count = sum(1 for a, b in pairs if s[a, b] <= lo or s[a, b] >= hi)
        got = db.recall.get(tail, db.curve.get(tail))
        assert got == pytest.approx(count / len(pairs), abs=1e-12), tail


def test_planted_high_similarity_pairs_have_recall_one():
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((60, 16))
    unit[1::2] = unit[0::2] + 0.01 * rng.standard_normal((30, 16))    # 30 planted near-identical pairs
    names = np.array([f"G{i}" for i in range(60)], dtype=object)
    pmap = PerturbationMap(names=names, unit=unit_rows(unit.astype(np.float32)), replicates=np.ones(60, int), report={})
    rel = pd.DataFrame({"entity1": names[0::2], "entity2": names[1::2]})
    result, _ = evaluate_map(pmap, [load_relationships(rel, "planted")], EvalConfig())
    assert result.databases["planted"].recall[5.0] == 1.0


def test_random_embeddings_recall_threshold_mass():
    rng = np.random.default_rng(4)
    n = 300
    names = np.array([f"G{i}" for i in range(n)], dtype=object)
    pmap = PerturbationMap(names=names, unit=unit_rows(rng.standard_normal((n, 16)).astype(np.float32)),
                           replicates=np.ones(n, int), report={})
    first, second = np.triu_indices(n, k=1)
    pick = rng.choice(first.size, 4000, replace=False)
    rel = pd.DataFrame({"entity1": names[first[pick]], "entity2": names[second[pick]]})
    result, _ = evaluate_map(pmap, [load_relationships(rel, "random")], EvalConfig(tails=(5.0, 10.0)))
    recall = result.databases["random"].recall
    sigma5, sigma10 = np.sqrt(0.1 * 0.9 / 4000), np.sqrt(0.2 * 0.8 / 4000)
    assert abs(recall[5.0] - 0.10) < 4 * sigma5
    assert abs(recall[10.0] - 0.20) < 4 * sigma10


def test_relationship_file_sorting_self_pairs_duplicates(tmp_path):
    path = tmp_path / "db.csv"
    path.write_text("entity1,entity2,score\nB,A,1\nA,B,2\nC,C,3\nNA,B,4\n,B,5\n")
    rel = load_relationships(path)
    assert rel.name == "db"
    assert rel.pairs.values.tolist() == [["A", "B"], ["B", "NA"]]   # "NA" stays a gene symbol
    assert (rel.n_rows, rel.n_self_pairs, rel.n_duplicate_pairs, rel.n_empty_rows) == (5, 1, 1, 1)
    empty = tmp_path / "empty.csv"
    empty.write_text("entity1,entity2\n")
    assert load_relationships(empty).first.size == 0


def test_relationship_wrong_header_is_an_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("gene_a,gene_b\nA,B\n")
    with pytest.raises(EvaluationInputError, match=r"entity1,entity2.*gene_a,gene_b"):
        load_relationships(path)


# --------------------------------------------------------------------------- TVN

def reference_tvn(x, batch, control, shrinkage, whiten=True):
    """Step by step in float64 (PCA axes keep eigh's arbitrary signs). whiten=False stops after step 3."""
    xc = x[control].astype(np.float64)
    z = (x - xc.mean(0)) / xc.std(0)
    values, vectors = np.linalg.eigh(np.cov(z[control], rowvar=False, ddof=0))
    vectors = vectors[:, np.argsort(values)[::-1]]
    p = z @ vectors
    out = np.empty_like(p)
    for b in np.unique(batch):
        rows, ctrl = batch == b, control & (batch == b)
        m, s = p[ctrl].mean(0), p[ctrl].std(0)
        if not whiten:
            out[rows] = (p[rows] - m) / s
            continue
        cov = np.cov((p[ctrl] - m) / s, rowvar=False) + shrinkage * np.eye(x.shape[1])
        e, v = np.linalg.eigh(cov)
        out[rows] = ((p[rows] - m) / s) @ (v / np.sqrt(e)) @ v.T
    return out


def _aligned(a, b):
    """b with each column's sign matched to a (PCA axes have an arbitrary sign)."""
    return b * np.sign((a * b).sum(axis=0))


def test_tvn_matches_step_by_step_reference():
    frame, *_ = planted_screen(seed=5, dims=10, controls_per_batch=60)
    table = well_table_from_frame(frame)
    transform = fit_tvn(table.features, table.batch_codes, table.is_control, shrinkage=0.5)
    got = transform.apply(table.features, table.batch_codes).astype(np.float64)
    expected = reference_tvn(table.features.astype(np.float64), table.batch_codes, table.is_control, 0.5)
    np.testing.assert_allclose(_aligned(expected, got), expected, rtol=1e-3, atol=2e-4)


def test_tvn_controls_identity_covariance_per_batch_and_offset_removed():
    frame, *_ = planted_screen(seed=6, dims=12, controls_per_batch=150, batch_offset=20.0)
    table = well_table_from_frame(frame)
    for shrinkage in (0.0, 0.5):
        transform = fit_tvn(table.features, table.batch_codes, table.is_control, shrinkage=shrinkage)
        out = transform.apply(table.features, table.batch_codes).astype(np.float64)
        for b in range(3):
            ctrl = out[table.is_control & (table.batch_codes == b)]
            np.testing.assert_allclose(ctrl.mean(0), 0.0, atol=1e-4)      # offset gone
            cov = np.cov(ctrl, rowvar=False)
            if shrinkage == 0.0:
                np.testing.assert_allclose(cov, np.eye(12), atol=2e-4)
            else:   # (C + 0.5 I)^-1/2 C (C + 0.5 I)^-1/2: eigenvalues lambda / (lambda + 0.5) of C = cov before step 4
                before = reference_tvn(table.features.astype(np.float64), table.batch_codes, table.is_control, 0.5,
                                       whiten=False)
                lam = np.linalg.eigvalsh(np.cov(before[table.is_control & (table.batch_codes == b)], rowvar=False))
                np.testing.assert_allclose(np.linalg.eigvalsh(cov), lam / (lam + 0.5), atol=2e-4)
    # the same gene measured in different batches ends up in the same place (offset of 20 sd removed)
    genes = table.perturbation
    for g in ("CPX0_0", "SOLO03"):
        by_batch = [out[(genes == g) & (table.batch_codes == b)].mean(0) for b in range(3)]
        raw = [table.features[(genes == g) & (table.batch_codes == b)].mean(0) for b in range(3)]
        assert np.linalg.norm(by_batch[0] - by_batch[1]) < 0.2 * np.linalg.norm(raw[0] - raw[1])


def test_tvn_fewer_controls_than_dims_is_stable_and_deterministic():
    frame, *_ = planted_screen(seed=7, dims=40, controls_per_batch=8)       # 24 controls for 40 dims
    frame["feature_3"] = 1.25                                                # a constant feature too
    table = well_table_from_frame(frame)
    first = fit_tvn(table.features, table.batch_codes, table.is_control)
    second = fit_tvn(table.features, table.batch_codes, table.is_control)
    np.testing.assert_array_equal(first.linear, second.linear)
    assert first.n_constant_features == 1
    assert first.n_null_directions == 40 - 23            # controls span n_controls - 1 directions
    for shrinkage in (0.5, 0.0):
        out = fit_tvn(table.features, table.batch_codes, table.is_control, shrinkage=shrinkage).apply(
            table.features, table.batch_codes)
        assert np.isfinite(out).all()
        assert np.abs(out).max() < 1e3                   # nothing divided by a near-zero spread
        for b in range(3):
            np.testing.assert_allclose(out[table.is_control & (table.batch_codes == b)].mean(0), 0, atol=1e-3)


@pytest.mark.parametrize("n, dims", [(7, 19), (19, 19), (40, 11)])
@pytest.mark.parametrize("shrinkage", [0.5, 0.0])
def test_low_rank_whitening_equals_dense_inverse_sqrt(n, dims, shrinkage):
    rng = np.random.default_rng(n + dims)
    q = rng.standard_normal((n, dims)) * rng.uniform(0.2, 3.0, dims)
    q -= q.mean(axis=0)
    alpha, basis, e = whitening_factors(q, shrinkage)
    got = alpha * np.eye(dims) + (basis * e) @ basis.T
    dense = inverse_sqrt(np.cov(q, rowvar=False) + shrinkage * np.eye(dims))
    np.testing.assert_allclose(got, dense, atol=1e-8)


def test_tvn_needs_two_controls_per_batch():
    frame, *_ = planted_screen(seed=8, dims=6, controls_per_batch=5)
    drop = frame.index[(frame.gene == "EMPTY_control") & (frame.experiment_name == "E1")][1:]
    table = well_table_from_frame(frame.drop(drop))
    with pytest.raises(EvaluationInputError, match=r"batch\(es\) E1 have 1"):
        fit_tvn(table.features, table.batch_codes, table.is_control, table.batch_names)


# --------------------------------------------------------------------------- arm correction and aggregation

def test_arm_correction_removes_planted_arm_shift():
    frame, _, arms, truth = planted_screen(seed=9, dims=16, arm_effect=3.0, n_arms=3, n_singletons=40, noise=0.5)
    table = well_table_from_frame(frame)
    arm_table = load_arm_table(arms)
    corrected, report = chromosome_arm_correction(table.features, table.perturbation, table.is_control, arm_table, 3)
    assert sorted(report.arms_corrected) == ["chr1p", "chr2p", "chr3p"] and not report.arms_skipped
    np.testing.assert_array_equal(corrected[table.is_control], table.features[table.is_control])

    # oracle: per arm, mean over unexpressed genes of each gene's mean well, subtracted from the arm's genes
    genes = pd.Series(table.perturbation[~table.is_control])
    gene_means = pd.DataFrame(table.features[~table.is_control]).groupby(genes.to_numpy()).mean()
    lookup = arms.set_index("gene")
    reference = gene_means[~lookup.loc[gene_means.index, "expressed"].to_numpy()]
    arm_means = reference.groupby(lookup.loc[reference.index, "chromosome_arm"].to_numpy()).mean()
    arm_means -= table.features[table.is_control].mean(0)                   # shifts measured from the controls
    expected = table.features[~table.is_control] - arm_means.loc[
        lookup.loc[genes, "chromosome_arm"].to_numpy()].to_numpy()
    np.testing.assert_allclose(corrected[~table.is_control], expected, rtol=1e-5, atol=1e-5)

    # the planted arm shift is gone: unexpressed genes of every arm now average ~ the controls
    unexpressed = np.array([not truth["expressed"][g] for g in table.perturbation[~table.is_control]])
    controls_mean = table.features[table.is_control].mean(0)
    for arm in ("chr1p", "chr2p", "chr3p"):
        on_arm = np.array([truth["arm_of"][g] == arm for g in table.perturbation[~table.is_control]])
        before = table.features[~table.is_control][on_arm & unexpressed].mean(0) - controls_mean
        after = corrected[~table.is_control][on_arm & unexpressed].mean(0) - controls_mean
        assert np.linalg.norm(after) < 0.1 * np.linalg.norm(before)


def test_arm_correction_reports_small_arms_and_genes_without_arm():
    frame, _, arms, _ = planted_screen(seed=10, dims=6, n_arms=2)
    arms = arms[arms.gene != "SOLO00"]
    arms.loc[arms.chromosome_arm == "chr2p", "expressed"] = True            # chr2p: no reference gene
    table = well_table_from_frame(frame)
    corrected, report = chromosome_arm_correction(table.features, table.perturbation, table.is_control,
                                                  load_arm_table(arms), min_genes=2)
    assert report.arms_skipped == {"chr2p": 0} and "chr1p" in report.arms_corrected
    assert report.genes_without_arm == 1 and report.genes_without_arm_examples == ["SOLO00"]
    untouched = np.isin(table.perturbation, list(arms.gene[arms.chromosome_arm == "chr2p"]) + ["SOLO00"])
    np.testing.assert_array_equal(corrected[untouched], table.features[untouched])


def test_arm_table_conflicting_arms_is_an_error():
    arms = pd.DataFrame({"gene": ["A", "A", "B"], "chromosome_arm": ["1p", "2q", "1p"]})
    with pytest.raises(EvaluationInputError, match="A are listed on more than one arm"):
        load_arm_table(arms)
    numeric = load_arm_table(pd.DataFrame({"gene": ["A", "B"], "chromosome_arm": ["1p", "1p"], "expression": [0.2, 5.0]}))
    assert numeric.frame.reference.tolist() == [True, False]


def test_spherical_mean_by_hand():
    features = np.array([[3, 4], [0, 2], [1, 1], [-1, -1], [6, 0]], dtype=np.float32)
    perturbation = np.array(["A", "A", "c", "c", "B"], dtype=object)
    is_control = np.array([False, False, True, True, False])
    means = spherical_mean(features, perturbation, is_control)       # origin = (0, 0)
    assert means.names.tolist() == ["A", "B"]
    np.testing.assert_allclose(means.means, [[(0.6 + 0) / 2, (0.8 + 1) / 2], [1, 0]], rtol=1e-6)
    assert means.replicates.tolist() == [2, 1]
    with pytest.raises(EvaluationInputError, match="no direction"):
        spherical_mean(np.array([[0, 0], [1, 1], [-1, -1]], np.float32), np.array(["A", "c", "c"], object),
                       np.array([False, True, True]))


# --------------------------------------------------------------------------- whole pipeline

def test_planted_complexes_recovered_far_above_random():
    frame, pairs, arms, _ = planted_screen(seed=11, arm_effect=2.0, n_singletons=40)
    result = evaluate(frame, {"planted": pairs}, arms=arms, baselines=("random",))
    model, random = (result.sources[s].databases["planted"].recall[5.0] for s in ("model", "random"))
    assert model >= 0.9
    assert random <= 0.35                    # chance 0.10, 36 pairs: sd 0.05
    assert result.sources["model"].n_perturbations == 64
    assert result.sources["model"].report["arm_correction"]["arms_corrected"]
    # without the arm correction the planted arm shifts swamp the complexes
    uncorrected = evaluate(frame, {"planted": pairs}).sources["model"].databases["planted"].recall[5.0]
    assert uncorrected < 0.5


def test_block_wise_table_scores_each_block_and_headlines_by_activity():
    """A `block` column: one source per block; the headline block is the one with the highest activity mAP (wells
    vs controls, no relationships) -- here block 2, where the perturbations are visible, not block 1 (noise)."""
    frame, pairs, _, _ = planted_screen(seed=13, dims=8, n_singletons=8)
    features = [c for c in frame.columns if c.startswith("feature_")]
    noise = frame.copy()
    noise[features] = np.random.default_rng(0).standard_normal((len(frame), len(features))).astype(np.float32)
    table = pd.concat([noise.assign(block=1), frame.assign(block=2)], ignore_index=True)
    result = evaluate(table, {"planted": pairs}, baselines=("random",), name="m")
    assert list(result.sources) == ["m block 1", "m block 2", "random"]
    plain = evaluate(frame, {"planted": pairs}, name="m").sources["m"]
    assert result.sources["m block 2"].databases["planted"].recall == plain.databases["planted"].recall
    choice = result.block_choice
    assert (choice["block"], choice["last_block"], choice["source"]) == (2, 2, "m block 2")
    assert choice["activity_map"]["2"] > choice["activity_map"]["1"] and "activity mAP" in choice["criterion"]
    assert "headline block: 2 of 2" in markdown_table(result)
    swapped = evaluate(table.assign(block=3 - table["block"]), {"planted": pairs}, name="m").block_choice
    assert (swapped["block"], swapped["last_block"]) == (1, 2)  # the choice follows activity, not depth
    no_map = evaluate(table, {"planted": pairs}, config=EvalConfig(map_metrics=False), name="m").block_choice
    assert no_map["block"] == 2 and "last block" in no_map["criterion"]
    assert evaluate(frame, {"planted": pairs}).block_choice is None
    with pytest.raises(EvaluationInputError, match="block numbers"):
        evaluate(table.assign(block="x"), {"planted": pairs})


def test_evaluate_is_deterministic():
    frame, pairs, arms, _ = planted_screen(seed=12, dims=8)
    a = evaluate(frame, {"p": pairs}, arms=arms, baselines=("random",))
    b = evaluate(frame, {"p": pairs}, arms=arms, baselines=("random",))
    assert markdown_table(a) == markdown_table(b)
    np.testing.assert_array_equal(a.maps["model"].unit, b.maps["model"].unit)
    np.testing.assert_array_equal(a.maps["random"].unit, b.maps["random"].unit)


def test_random_baseline_keeps_wells_and_shape():
    frame, *_ = planted_screen(seed=13, dims=5)
    table = well_table_from_frame(frame)
    random = random_embeddings_like(table, seed=1)
    assert random.features.shape == table.features.shape and random.features.dtype == np.float32
    assert (random.perturbation == table.perturbation).all() and (random.batch_codes == table.batch_codes).all()
    assert not np.allclose(random.features, table.features)


# --------------------------------------------------------------------------- input handling and bad input

def test_missing_columns_are_named():
    frame, pairs, *_ = planted_screen(seed=14, dims=4)
    with pytest.raises(EvaluationInputError, match=r"missing column\(s\) 'gene', 'experiment_name'"):
        well_table_from_frame(frame.drop(columns=["gene", "experiment_name"]))
    with pytest.raises(EvaluationInputError, match=r"'my_batch'"):
        evaluate(frame, pairs, config=EvalConfig(columns=ColumnSpec(batch="my_batch")))


def test_nonfinite_features_name_the_rows():
    frame, *_ = planted_screen(seed=15, dims=4)
    frame.loc[7, "feature_2"] = np.nan
    frame.loc[19, "feature_0"] = np.inf
    with pytest.raises(EvaluationInputError, match=r"2 row\(s\): row 7 \(E0_0007\), row 19 \(E0_0019\).*feature_0, feature_2"):
        well_table_from_frame(frame)


def test_no_negative_controls_is_an_error():
    frame, *_ = planted_screen(seed=16, dims=4)
    with pytest.raises(EvaluationInputError, match="no negative controls"):
        well_table_from_frame(frame[frame.gene != "EMPTY_control"])
    flagged = frame.assign(is_ctrl=False)
    with pytest.raises(EvaluationInputError, match="'is_ctrl' is never true"):
        well_table_from_frame(flagged, ColumnSpec(control_column="is_ctrl"))


def test_control_column_and_custom_names():
    frame, pairs, *_ = planted_screen(seed=17, dims=6)
    renamed = frame.rename(columns={"gene": "target", "experiment_name": "run"})
    renamed = renamed.rename(columns={c: c.replace("feature_", "emb") for c in frame.columns if c.startswith("feature_")})
    renamed["ctrl"] = renamed.target == "EMPTY_control"
    renamed.loc[renamed.ctrl, "target"] = "non-targeting"
    spec = ColumnSpec(perturbation="target", batch="run", control_column="ctrl")
    table = well_table_from_frame(renamed, spec)
    assert table.dims == 6 and table.feature_columns[0] == "emb0"          # numeric non-metadata columns
    assert table.is_control.sum() == 120
    result = evaluate(renamed, {"p": pairs}, config=EvalConfig(columns=spec))
    assert result.sources["model"].n_perturbations == 48                    # controls are not in the map


def test_perturbation_without_replicates_is_reported_or_an_error():
    frame, pairs, *_ = planted_screen(seed=18, dims=6)
    frame["gene"] = pd.Categorical(frame.gene, categories=sorted(set(frame.gene)) + ["GHOST"])
    frame = frame[~((frame.gene == "SOLO05") & (frame.well_id != "E0_0058"))]    # SOLO05: a single well
    frame = frame.reset_index(drop=True)
    result = evaluate(frame, {"p": pairs}, config=EvalConfig(min_replicates=2))
    reps = result.sources["model"].report["replicates"]
    assert reps["perturbations_without_wells_examples"] == ["GHOST"]
    assert reps["perturbations_below_min_replicates_examples"] == ["SOLO05"]
    assert "SOLO05" not in set(result.maps["model"].names) and "GHOST" not in set(result.maps["model"].names)
    with pytest.raises(EvaluationInputError, match="GHOST, SOLO05"):
        evaluate(frame, {"p": pairs}, config=EvalConfig(min_replicates=2, strict_replicates=True))


def test_genes_absent_from_map_are_counted_not_an_error():
    frame, pairs, *_ = planted_screen(seed=19, dims=6)
    extra = pd.DataFrame({"entity1": ["NOPE1", "NOPE2", "CPX0_0"], "entity2": ["CPX0_1", "NOPE1", "NOPE3"]})
    result = evaluate(frame, {"p": pd.concat([pairs, extra])})
    db = result.sources["model"].databases["p"]
    assert (db.genes_absent, db.pairs_dropped, db.n_pairs) == (3, 3, len(pairs))
    assert db.absent_examples == ["NOPE1", "NOPE2", "NOPE3"]


def test_rows_without_perturbation_are_skipped_and_counted():
    frame, pairs, *_ = planted_screen(seed=20, dims=6)
    frame.loc[[3, 4, 5], "gene"] = np.nan
    result = evaluate(frame, {"p": pairs})
    assert result.sources["model"].report["rows_without_perturbation_skipped"] == 3


def test_parquet_and_csv_inputs_agree(tmp_path):
    frame, pairs, *_ = planted_screen(seed=21, dims=6)
    frame.loc[frame.gene == "SOLO00", "gene"] = "NA"      # a symbol pandas would read as missing
    frame.to_parquet(tmp_path / "e.parquet")
    frame.to_csv(tmp_path / "e.csv", index=False)
    a = evaluate(tmp_path / "e.parquet", {"p": pairs})
    b = evaluate(tmp_path / "e.csv", {"p": pairs})
    assert "NA" in set(a.maps["model"].names) and "NA" in set(b.maps["model"].names)
    np.testing.assert_allclose(a.maps["model"].unit, b.maps["model"].unit, atol=1e-5)
    with pytest.raises(EvaluationInputError, match="not found"):
        evaluate(tmp_path / "missing.parquet", {"p": pairs})


def test_non_numeric_feature_and_bad_options():
    frame, pairs, *_ = planted_screen(seed=22, dims=4)
    with pytest.raises(EvaluationInputError, match="'feature_1' are not numeric"):
        well_table_from_frame(frame.assign(feature_1="x"))
    with pytest.raises(EvaluationInputError, match="unknown baseline"):
        evaluate(frame, pairs, baselines=("shuffled",))
    with pytest.raises(EvaluationInputError, match="images_root"):
        evaluate(frame, pairs, baselines=("pixel-stats",))
    with pytest.raises(EvaluationInputError, match="tails"):
        EvalConfig(tails=(60.0,))


# --------------------------------------------------------------------------- pixel statistics

def _numpy_pixel_stats(images, scale):
    x = images.astype(np.float64) / scale
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    stats = [flat.mean(-1), flat.std(-1)] + list(np.percentile(flat, [5, 50, 95], axis=-1))
    return np.stack(stats, axis=-1).reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype, scale", [(np.uint16, 65535.0), (np.uint8, 255.0)])
def test_pixel_statistics_integer_images(dtype, scale):
    rng = np.random.default_rng(23)
    images = rng.integers(0, int(scale) + 1, size=(3, 6, 37, 29)).astype(dtype)
    got = pixel_statistics(images)
    assert got.shape == (3, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_pixel_stats(images, scale), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pixel_statistics(torch.from_numpy(images)), got)
    assert len(pixel_feature_names(6)) == 30 and pixel_feature_names(6)[:2] == ["w1_mean", "w1_std"]


def test_pixel_statistics_float_and_bad_shape():
    rng = np.random.default_rng(24)
    images = rng.random((2, 5, 17, 9)).astype(np.float32)
    np.testing.assert_allclose(pixel_statistics(torch.from_numpy(images)), _numpy_pixel_stats(images, 1.0), rtol=1e-6)
    with pytest.raises(EvaluationInputError, match=r"\(B, C, H, W\)"):
        pixel_statistics(images[0])


def _write_tiny_rxrx3(root, bit_depth=16, channels=3):
    from PIL import Image

    rng = np.random.default_rng(25)
    rows = []
    for e, p, a, gene in [("exp1", 1, "A01", "EMPTY_control"), ("exp1", 1, "B02", "GENE1"), ("exp1", 2, "C03", "GENE2")]:
        folder = root / "images" / e / f"Plate{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(1, channels + 1):
            if bit_depth == 16:
                Image.fromarray(rng.integers(0, 65536, (21, 13)).astype(np.uint16)).save(folder / f"{a}_s1_w{c}.png")
            else:
                Image.fromarray(rng.integers(0, 256, (21, 13)).astype(np.uint8)).save(folder / f"{a}_s1_w{c}.png")
        rows.append({"well_id": f"{e}_{p}_{a}", "experiment_name": e, "plate": p, "address": a, "gene": gene})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)


@pytest.mark.parametrize("bit_depth", [16, 8])
def test_pixel_statistics_table_reads_rxrx3_layout(tmp_path, bit_depth):
    from PIL import Image

    _write_tiny_rxrx3(tmp_path, bit_depth)
    table = pixel_statistics_table(str(tmp_path), channels=3, num_workers=2)
    assert table.shape == (3, 5 + 15) and table.gene.tolist() == ["EMPTY_control", "GENE1", "GENE2"]
    planes = np.stack([np.array(Image.open(tmp_path / "images/exp1/Plate1" / f"B02_s1_w{c}.png")) for c in (1, 2, 3)])
    scale = 65535.0 if bit_depth == 16 else 255.0
    np.testing.assert_allclose(table.filter(like="feature_").iloc[1].to_numpy(),
                               _numpy_pixel_stats(planes[None], scale)[0], rtol=1e-6, atol=1e-7)
    os.remove(tmp_path / "images/exp1/Plate2/C03_s1_w2.png")
    from mae_fast.data import DataError

    with pytest.raises(DataError, match=r"C03_s1_w2.png"):
        pixel_statistics_table(str(tmp_path), channels=3)


@pytest.fixture(scope="module")
def synthetic_screen(tmp_path_factory):
    """The synthetic RxRx3-layout screen, small (128 px sites): 8 complexes of 4 and 16 singletons."""
    synthetic = pytest.importorskip("mae_fast.data.synthetic")
    return synthetic.make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), site_size=128, n_complexes=8,
                                           complex_size=4, n_singletons=16, seed=0)


def test_synthetic_screen_planted_phenotype_recovers_complexes(synthetic_screen):
    """Embeddings carrying the screen's planted phenotypes (random 64-d projection + per-plate offsets + noise)
    recover the planted complexes far above random, through the screen's own files."""
    screen = synthetic_screen
    metadata = pd.read_csv(screen.metadata_csv)
    rng = np.random.default_rng(31)
    projection = rng.standard_normal((len(next(iter(screen.phenotypes.values()))), 64))
    plate_offset = {key: 3.0 * rng.standard_normal(64) for key in metadata.groupby(["experiment_name", "plate"]).groups}
    features = np.stack([
        screen.phenotypes[g] @ projection + plate_offset[(e, p)] + 0.5 * rng.standard_normal(64)
        for g, e, p in zip(metadata.gene, metadata.experiment_name, metadata.plate)
    ]).astype(np.float32)
    frame = pd.concat([metadata, pd.DataFrame(features, columns=[f"feature_{k}" for k in range(64)])], axis=1)
    pairs = pd.read_csv(screen.relationships_csv)
    expressed = screen.plan.expressed  # a pair with an unexpressed gene (10% of the effect) is hard for anyone
    both = pairs[[expressed[a] and expressed[b] for a, b in zip(pairs.entity1, pairs.entity2)]]
    result = evaluate(frame, {"complexes": screen.relationships_csv, "expressed": both}, arms=screen.arms_csv,
                      baselines=("random",))
    recalls = result.recall_table()
    assert result.sources["model"].databases["complexes"].n_pairs == 48
    assert recalls["expressed"]["model"] >= 0.6 and recalls["complexes"]["model"] >= 0.3
    assert recalls["complexes"]["random"] <= 0.2


def test_pixel_stats_on_tiny_synthetic_screen(synthetic_screen):
    screen = synthetic_screen
    pixels = pixel_statistics_table(screen.root, channels=screen.config.channels)
    result = evaluate(pixels, {"complexes": screen.relationships_csv}, arms=screen.arms_csv, baselines=("random",))
    recalls = result.recall_table()["complexes"]
    assert result.sources["model"].report["dims"] == 30
    assert result.sources["model"].n_perturbations == len(screen.genes)
    assert recalls["model"] > recalls["random"]       # intensity statistics see the planted phenotypes a little



# --------------------------------------------------------------------------- outputs and CLI

def test_outputs_json_markdown_plots(tmp_path):
    frame, pairs, arms, _ = planted_screen(seed=26, dims=8)
    other = pairs.iloc[:5]
    result = evaluate(frame, {"complexes": pairs, "other": other}, arms=arms, baselines=("random",),
                      config=EvalConfig(tails=(5.0, 10.0)))
    paths = write_outputs(result, str(tmp_path / "out"), heatmap_relationships="complexes")
    data = json.loads(open(paths["json"]).read())
    assert set(data["sources"]) == {"model", "random"}
    assert data["sources"]["model"]["databases"]["complexes"]["pairs"] == 36
    assert set(data["sources"]["model"]["databases"]["other"]["recall"]) == {"5", "10"}
    md = open(paths["markdown"]).read()
    assert "| source | complexes (n=36) | other (n=5) |" in md and "| random |" in md and "top 10%" in md
    for key in ("curve", "heatmap"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heatmap_groups_complexes_by_connected_component():
    frame, pairs, *_ = planted_screen(seed=27, dims=8)
    result = evaluate(frame, {"complexes": pairs})
    pmap = result.maps["model"]
    order, sizes = heatmap_order(pmap, result.relationship_sets["complexes"])
    assert sizes == [4] * 6
    blocks = [set(pmap.names[order[k:k + 4]]) for k in range(0, 24, 4)]
    assert all(len({g.split("_")[0] for g in block}) == 1 for block in blocks)


def test_connected_components_against_union_find():
    rng = np.random.default_rng(28)
    n = 70
    first, second = rng.integers(0, n, 60), rng.integers(0, n, 60)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(first, second):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = np.array([min(i for i in range(n) if find(i) == find(k)) for k in range(n)])
    np.testing.assert_array_equal(connected_components(first, second, n), expected)


def _cli(argv):
    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    return run_command(evaluate_cli.run, parser.parse_args(argv), "mae-fast evaluate")  # with the CLI's handler


def test_cli_end_to_end(tmp_path, capsys):
    frame, pairs, arms, _ = planted_screen(seed=29, dims=8)
    frame.to_parquet(tmp_path / "emb.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    pd.concat([pairs, pd.DataFrame({"entity1": ["ZZZ"], "entity2": ["CPX0_0"]})]).to_csv(tmp_path / "b.csv", index=False)
    arms.to_csv(tmp_path / "arms.csv", index=False)
    code = _cli([str(tmp_path / "emb.parquet"), "--relationships", str(tmp_path / "complexes.csv"),
                 f"other={tmp_path / 'b.csv'}", "--out", str(tmp_path / "out"), "--arms", str(tmp_path / "arms.csv"),
                 "--baselines", "random", "--tails", "5,10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| source | complexes (n=36) | other (n=36) |" in out and "| model |" in out and "| random |" in out
    assert "1 of 25 genes absent from the map" in out
    for name in ("evaluation.json", "recall.md", "recall_curve.png", "similarity_heatmap.png"):
        assert f"{tmp_path / 'out' / name}" in out and (tmp_path / "out" / name).exists()


def test_cli_reports_bad_input(tmp_path, capsys):
    frame, pairs, *_ = planted_screen(seed=30, dims=4)
    frame.drop(columns=["experiment_name"]).to_csv(tmp_path / "emb.csv", index=False)
    pairs.to_csv(tmp_path / "p.csv", index=False)
    code = _cli([str(tmp_path / "emb.csv"), "--relationships", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "'experiment_name'" in capsys.readouterr().err
