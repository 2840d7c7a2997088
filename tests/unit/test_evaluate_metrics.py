"""Issue 17 evaluation: EFAAR databases, TVN variants, bootstrap intervals, random over seeds, per-class recall,
JUMP mAP (activity, consistency) and the CellProfiler-style baseline."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import sys

import numpy as np
import pandas as pd
import pytest

from mae_fast.cli import evaluate as evaluate_cli
from mae_fast.evaluation import (
    EvalConfig,
    EvaluationInputError,
    activity_average_precision,
    benjamini_hochberg,
    bootstrap_interval,
    consistency_average_precision,
    corum_complexes,
    efaar_relationships,
    evaluate,
    fit_tvn,
    mean_average_precision,
    parse_relationship_args,
    random_embeddings_like,
    well_table_from_frame,
)
from mae_fast.evaluation import cellprofiler as cp_module
from mae_fast.evaluation.average_precision import null_average_precision, uniform_subsets
from mae_fast.evaluation.databases import EFAAR_DATABASES
from mae_fast.evaluation.pipeline import pair_classes


def planted(seed=0, n_batches=3, dims=16, n_complexes=6, size=4, n_solo=30, replicates=3, controls=40,
            batch_offset=4.0, effect=1.5):
    """Wells with planted complexes (shared directions) and per-batch offsets; returns (frame, pairs, genes)."""
    rng = np.random.default_rng(seed)
    complexes = [[f"CPX{k}_{j}" for j in range(size)] for k in range(n_complexes)]
    genes = [g for c in complexes for g in c] + [f"SOLO{i:02d}" for i in range(n_solo)]
    phenotype = {g: effect * rng.standard_normal(dims) for g in genes}
    for members in complexes:
        shared = effect * rng.standard_normal(dims)
        for g in members:
            phenotype[g] = shared + 0.3 * phenotype[g]
    rows, features = [], []
    for b in range(n_batches):
        offset = batch_offset * rng.standard_normal(dims)
        wells = [g for g in genes for _ in range(replicates)] + ["EMPTY_control"] * controls
        for w, gene in enumerate(wells):
            features.append(phenotype.get(gene, np.zeros(dims)) + rng.standard_normal(dims) + offset)
            rows.append({"well_id": f"E{b}_{w:04d}", "experiment_name": f"E{b}", "gene": gene})
    frame = pd.concat([pd.DataFrame(rows), pd.DataFrame(np.asarray(features, np.float32),
                                                         columns=[f"feature_{k}" for k in range(dims)])], axis=1)
    pairs = pd.DataFrame([p for c in complexes for p in itertools.combinations(c, 2)], columns=["entity1", "entity2"])
    return frame, pairs, genes


# --------------------------------------------------------------------------- EFAAR databases

@pytest.fixture
def fake_efaar(tmp_path, monkeypatch):
    """An 'installed' efaar_benchmarking whose import fails: the loader must only read its data files."""
    package = tmp_path / "site" / "efaar_benchmarking"
    annotations = package / "benchmark_annotations"
    annotations.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing efaar_benchmarking pulls scvi-tools')\n")
    pairs = {
        "CORUM": "entity1,entity2\nA,B\nB,A\nB,C\nC,C\n",
        "HuMAP": "entity1,entity2\nA,D\n",
        "Reactome": "entity1,entity2\nC,D\n",
        "SIGNOR": "entity1,entity2\nA,C\n",
        "StringDB": "entity1,entity2\nB,D\nD,B\nA,B\n",
    }
    for name, text in pairs.items():
        (annotations / f"{name}.txt").write_text(text)
    (annotations / "CORUM_clusters.tsv").write_text("complex one\tA B C\nsingle\tD\ncomplex two\tB D D\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    sys.modules.pop("efaar_benchmarking", None)
    return annotations


def test_efaar_databases_read_without_importing_the_package(fake_efaar):
    sets = efaar_relationships(["corum", "StringDB"])
    assert list(sets) == ["CORUM", "StringDB"]
    assert sets["CORUM"].pairs.values.tolist() == [["A", "B"], ["B", "C"]]      # sorted, deduplicated, no self
    assert sets["CORUM"].n_self_pairs == 1 and sets["CORUM"].n_duplicate_pairs == 1
    assert list(efaar_relationships("all")) == list(EFAAR_DATABASES)
    assert "efaar_benchmarking" not in sys.modules
    assert corum_complexes() == {"complex one": ["A", "B", "C"], "complex two": ["B", "D"]}


def test_efaar_relationship_arguments(fake_efaar, tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("entity1,entity2\nA,B\n")
    parsed = parse_relationship_args(["efaar:all", f"own={mine}", str(mine)])
    assert list(parsed) == list(EFAAR_DATABASES) + ["own", "mine"]
    with pytest.raises(EvaluationInputError, match="both named 'CORUM'"):
        parse_relationship_args(["efaar:CORUM", "efaar:corum"])
    with pytest.raises(EvaluationInputError, match="unknown EFAAR database 'corm'.*CORUM, HuMAP"):
        parse_relationship_args(["efaar:corm"])


def test_efaar_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvaluationInputError, match=r"pip install --no-deps efaar-benchmarking==1\.0"):
        efaar_relationships(["CORUM"])


@pytest.mark.skipif(importlib.util.find_spec("efaar_benchmarking") is None,
                    reason="efaar-benchmarking not installed (pip install --no-deps efaar-benchmarking==1.0)")
def test_real_installed_efaar_files():
    sets = efaar_relationships("all")
    assert set(sets) == set(EFAAR_DATABASES)
    assert all(s.first.size > 5_000 for s in sets.values())
    assert (sets["CORUM"].genes[sets["CORUM"].first] < sets["CORUM"].genes[sets["CORUM"].second]).all()
    complexes = corum_complexes()
    assert len(complexes) > 1_000 and all(len(g) >= 2 for g in complexes.values())


# --------------------------------------------------------------------------- TVN variants

def efaar10_reference(x, batch, control, shrinkage=0.5):
    """EFAAR 1.0's tvn_on_controls from its formula, in float64: centre-scale on all controls, PCA on the
    controls, centre-scale on all controls, per batch multiply by (cov(batch controls) + s I)^(-1/2)."""
    def centre_scale(a):
        return (a - a[control].mean(0)) / a[control].std(0)
    z = centre_scale(x.astype(np.float64))
    zc = z[control] - z[control].mean(0)
    values, vectors = np.linalg.eigh(zc.T @ zc / zc.shape[0])
    p = centre_scale(z @ vectors[:, np.argsort(values)[::-1]])
    out = np.empty_like(p)
    for b in np.unique(batch):
        rows = batch == b
        e, v = np.linalg.eigh(np.cov(p[rows & control], rowvar=False) + shrinkage * np.eye(x.shape[1]))
        out[rows] = p[rows] @ (v / np.sqrt(e)) @ v.T
    return out


def test_tvn_efaar10_matches_the_published_formula_and_keeps_batch_offsets():
    frame, _, _ = planted(seed=3, dims=8, controls=60, batch_offset=6.0)
    table = well_table_from_frame(frame)
    x, batch, control = table.features, table.batch_codes, table.is_control
    efaar = fit_tvn(x, batch, control, variant="efaar1.0").apply(x, batch).astype(np.float64)
    expected = efaar10_reference(x, batch, control)
    aligned = efaar * np.sign((efaar * expected).sum(axis=0))          # PCA axes have an arbitrary sign
    np.testing.assert_allclose(aligned, expected, rtol=1e-3, atol=3e-4)
    batchwise = fit_tvn(x, batch, control).apply(x, batch)
    for b in range(3):
        controls_b = control & (batch == b)
        assert np.abs(batchwise[controls_b].mean(0)).max() < 1e-4          # batchwise re-centres every batch
        assert np.abs(efaar[controls_b].mean(0)).max() > 0.1                # EFAAR 1.0 does not
    with pytest.raises(EvaluationInputError, match="unknown TVN variant"):
        fit_tvn(x, batch, control, variant="efaar")


def test_evaluate_runs_both_tvn_variants():
    frame, pairs, _ = planted(seed=4)
    for variant in ("batchwise", "efaar1.0"):
        result = evaluate(frame, {"cpx": pairs}, config=EvalConfig(tvn_variant=variant, map_metrics=False))
        assert result.sources["model"].report["tvn"]["variant"] == variant
        assert result.recall_table().loc["model", "cpx"] > 0.5


# --------------------------------------------------------------------------- intervals, seeds, classes

def test_bootstrap_interval_equals_resampling_pairs():
    rng = np.random.default_rng(0)
    hits = rng.random(400) < 0.3
    low, high = bootstrap_interval(hits, 20_000, 95.0, np.random.default_rng(1))
    resampled = hits[rng.integers(0, hits.size, (20_000, hits.size))].mean(axis=1)
    explicit = np.percentile(resampled, [2.5, 97.5])
    assert abs(low - explicit[0]) <= 0.006 and abs(high - explicit[1]) <= 0.006
    assert low < hits.mean() < high
    assert bootstrap_interval(hits, 1000, 95.0, np.random.default_rng(2)) == \
        bootstrap_interval(hits, 1000, 95.0, np.random.default_rng(2))
    assert np.isnan(bootstrap_interval(hits[:0], 100, 95.0, rng)).all()


def test_random_baseline_is_the_mean_over_seeds():
    frame, pairs, _ = planted(seed=5)
    config = EvalConfig(random_seeds=3, map_metrics=True)
    result = evaluate(frame, {"cpx": pairs}, baselines=("random",), config=config)
    random_result = result.sources["random"]
    table = well_table_from_frame(frame)
    singles = [evaluate(random_embeddings_like(table, s), {"cpx": pairs}, config=EvalConfig(random_seeds=1))
               for s in range(3)]
    recalls = [s.sources["model"].databases["cpx"].recall[5.0] for s in singles]
    maps = [s.sources["model"].activity_map for s in singles]
    assert random_result.seeds == 3
    assert random_result.databases["cpx"].recall[5.0] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert random_result.databases["cpx"].spread["recall@5"] == pytest.approx(np.std(recalls, ddof=1), abs=1e-12)
    assert random_result.activity_map == pytest.approx(np.mean(maps), abs=1e-12)
    rows = result.table()
    model_row = rows[(rows.source == "model") & (rows.phenotype_class == "all")].iloc[0]
    assert model_row.recall_low <= model_row.recall <= model_row.recall_high and model_row.n_pairs == 36
    assert rows[rows.source == "random"].seeds.eq(3).all()
    text = result.markdown()
    assert "±" in text and "[" in text and "mAP (JUMP)" in text


def test_per_class_recall_counts_and_values():
    frame, pairs, genes = planted(seed=6)
    classes = {g: ("texture" if g.startswith("CPX0") or g.startswith("CPX1") else "intensity")
               for g in genes if g.startswith("CPX")}
    classes["CPX2_0"] = "shape"                         # pairs of CPX2_0 with its complex become "mixed"
    result = evaluate(frame, {"cpx": pairs}, gene_classes=classes, config=EvalConfig(map_metrics=False))
    record = result.sources["model"].databases["cpx"]
    assert {c: e.n_pairs for c, e in record.per_class.items()} == {"texture": 12, "intensity": 21, "mixed": 3}
    sims = result.maps["model"]
    # brute force: recall of the texture pairs from the map's cosine similarities and the thresholds
    lower, upper = result.sources["model"].thresholds[5.0]
    index = sims.index_of
    texture = pairs[pairs.entity1.map(classes).eq("texture") & pairs.entity2.map(classes).eq("texture")]
    values = (sims.unit[index(texture.entity1)] * sims.unit[index(texture.entity2)]).sum(axis=1)
    assert record.per_class["texture"].recall[5.0] == pytest.approx(((values <= lower) | (values >= upper)).mean())
    assert pair_classes(np.array([0, 0, 1]), np.array([1, 2, 2]), np.array(["a", "a", ""], dtype=object)).tolist() \
        == ["a", "unclassified", "unclassified"]


# --------------------------------------------------------------------------- mAP

def brute_force_ap(similarities: np.ndarray, positive: np.ndarray) -> float:
    """Rank by similarity (positives first on ties), AP = mean precision at each positive."""
    order = np.lexsort([~positive, -similarities])
    relevant = positive[order]
    precision = np.cumsum(relevant) / np.arange(1, relevant.size + 1)
    return float(precision[relevant].mean())


def test_activity_ap_equals_brute_force():
    rng = np.random.default_rng(7)
    labels = np.array(["g0"] * 4 + ["g1"] * 3 + ["g2"] * 1 + ["g3"] * 2 + ["ctrl"] * 25, dtype=object)
    features = rng.standard_normal((labels.size, 6)).astype(np.float32)
    control = labels == "ctrl"
    got = activity_average_precision(features, labels, control, block_rows=3).set_index("well")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert sorted(got.perturbation.unique()) == ["g0", "g1", "g3"]             # g2 has no replicate
    for well, row in got.iterrows():
        others = np.flatnonzero(((labels == labels[well]) | control) & (np.arange(labels.size) != well))
        expected = brute_force_ap(unit[others] @ unit[well], labels[others] == labels[well])
        assert row.average_precision == pytest.approx(expected, abs=1e-6)
        assert row.n_total_pairs == (labels == labels[well]).sum() - 1 + 25


def test_consistency_ap_equals_brute_force():
    rng = np.random.default_rng(8)
    n = 40
    unit = rng.standard_normal((n, 5)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    first, second = rng.integers(0, n, 70), rng.integers(0, n, 70)
    keep = first != second
    first, second = first[keep], second[keep]
    got = consistency_average_precision(lambda rows: unit[rows] @ unit.T, n, first, second, block_rows=6)
    for _, row in got.iterrows():
        q = int(row["query"])
        partners = set(second[first == q].tolist()) | set(first[second == q].tolist())
        others = np.array([j for j in range(n) if j != q])
        expected = brute_force_ap(unit[others] @ unit[q], np.isin(others, list(partners)))
        assert row.average_precision == pytest.approx(expected, abs=1e-6)
        assert row.n_pos_pairs == len(partners) and row.n_total_pairs == n - 1


def test_ap_matches_copairs():
    copairs_map = pytest.importorskip("copairs.map")
    rng = np.random.default_rng(9)
    labels = np.array([f"g{i}" for i in np.repeat(np.arange(12), 3)] + ["ctrl"] * 20, dtype=object)
    features = rng.standard_normal((labels.size, 7)).astype(np.float32)
    features[:36] += np.repeat(rng.standard_normal((12, 7)), 3, axis=0).astype(np.float32)
    control = labels == "ctrl"
    ours = activity_average_precision(features, labels, control).sort_values("well")
    meta = pd.DataFrame({"pert": labels, "reference": np.where(control, np.arange(labels.size), -1)})
    theirs = copairs_map.average_precision(meta, features, ["pert", "reference"], [], [], ["pert", "reference"],
                                           progress_bar=False)
    theirs = theirs[theirs.n_pos_pairs > 0]
    np.testing.assert_allclose(ours.average_precision.to_numpy(), theirs.average_precision.to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.n_total_pairs.to_numpy(), theirs.n_total_pairs.to_numpy())


def exact_expected_ap(k: int, total: int) -> float:
    """E[AP] of k positives among `total` under a uniformly random ranking (closed form)."""
    harmonic = np.sum(1.0 / np.arange(1, total + 1))
    return ((k - 1) / (total - 1) * (total - harmonic) + harmonic) / total


@pytest.mark.parametrize("k, total", [(1, 7), (3, 43), (20, 30), (150, 2_000), (400, 5_000), (9, 10)])
def test_null_ap_has_the_exact_expected_value(k, total):
    null = null_average_precision(k, total, 40_000, 0)
    assert null.mean() == pytest.approx(exact_expected_ap(k, total), abs=4 * null.std() / 200 + 1e-12)


@pytest.mark.parametrize("k, total", [(2, 5), (4, 5), (3, 6)])
def test_uniform_subsets_are_uniform(k, total):
    draws = uniform_subsets(k, total, 60_000, np.random.default_rng(1))
    assert (np.diff(draws, axis=1) > 0).all() and draws.min() >= 0 and draws.max() < total
    _, counts = np.unique(draws, axis=0, return_counts=True)
    assert counts.size == len(list(itertools.combinations(range(total), k)))
    expected = 60_000 / counts.size
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_benjamini_hochberg_by_hand_and_against_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    np.testing.assert_allclose(benjamini_hochberg(p)[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.2])   # 0.04*4/3 < 0.03*4/2
    assert np.isnan(benjamini_hochberg(p)[4])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    q = np.random.default_rng(2).random(200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(q), multitest.multipletests(q, method="fdr_bh")[1], atol=1e-12)


def test_map_p_values_follow_the_copairs_rule():
    ap = pd.DataFrame({"group": ["a", "a", "b"], "average_precision": [1.0, 1.0, 0.0],
                       "n_pos_pairs": [2, 2, 2], "n_total_pairs": [30, 30, 30]})
    result = mean_average_precision(ap, "group", "activity", null_size=500, seed=3)
    null = null_average_precision(2, 30, 500, 3)
    got = result.groups.set_index("group")
    assert got.loc["a", "p_value"] == pytest.approx(((null > 1.0).sum() + 1) / 501)
    assert got.loc["b", "p_value"] == pytest.approx(((null > 0.0).sum() + 1) / 501)
    assert got.loc["a", "retrieved"] and not got.loc["b", "retrieved"]
    assert result.fraction_retrieved == 0.5


def test_map_separates_planted_signal_from_random():
    frame, pairs, _ = planted(seed=10)
    result = evaluate(frame, {"cpx": pairs}, baselines=("random",), config=EvalConfig(random_seeds=2))
    model, random = result.sources["model"], result.sources["random"]
    assert model.activity_retrieved > 0.9 and random.activity_retrieved < 0.2
    assert model.databases["cpx"].consistency_retrieved > 0.8 > 0.2 > random.databases["cpx"].consistency_retrieved
    assert model.activity.n_groups == 54                                       # every gene has 3 wells
    off = evaluate(frame, {"cpx": pairs}, config=EvalConfig(map_metrics=False))
    assert np.isnan(off.sources["model"].activity_map)


# --------------------------------------------------------------------------- CellProfiler-style baseline

def blob_site(rng, centres, size=96, channels=3, radius=5):
    """(C, H, W) uint8: bright nuclei discs in channel 0, larger dimmer cells around them in the others."""
    yy, xx = np.mgrid[:size, :size]
    image = rng.integers(0, 6, (channels, size, size)).astype(np.float64)
    for y, x in centres:
        distance = np.hypot(yy - y, xx - x)
        image[0][distance <= radius] += 180
        image[1:, distance <= 2.2 * radius] += 90
    return np.clip(image, 0, 255).astype(np.uint8)


def test_segmentation_finds_planted_nuclei_and_one_cell_each():
    pytest.importorskip("skimage")
    rng = np.random.default_rng(11)
    centres = [(16, 16), (16, 60), (50, 30), (78, 78), (70, 20)]
    nuclei, cells = cp_module.segment_site(blob_site(rng, centres))
    assert nuclei.max() == len(centres) and cells.max() == len(centres)
    for label, (y, x) in enumerate(centres):
        assert nuclei[y, x] > 0 and cells[y, x] == nuclei[y, x]
    assert ((cells > 0).sum()) > 3 * (nuclei > 0).sum()                        # cells grow beyond the nuclei


def test_cellprofiler_features_and_table(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("cp_measure")
    rng = np.random.default_rng(12)
    site = blob_site(rng, [(20, 20), (20, 70), (70, 45)])
    features = cp_module.site_cell_features(site)
    assert len(features) == 3
    assert {"Cells_AreaShape_Area", "Nuclei_AreaShape_Area", "Cells_Intensity_w1_Intensity_MeanIntensity"} <= set(features)
    assert (features["Cells_AreaShape_Area"] > features["Nuclei_AreaShape_Area"]).all()
    assert features["Cells_Intensity_w2_Intensity_MeanIntensity"].gt(0.2).all()


def test_cellprofiler_table_is_the_median_over_cells_of_all_sites(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("cp_measure")
    from PIL import Image

    rng = np.random.default_rng(13)
    layouts = {("A01", 1): [(20, 20), (20, 70)], ("A01", 2): [(60, 60)], ("B02", 1): [(30, 30), (70, 60)]}
    sites = {}
    for (address, site), centres in layouts.items():
        folder = tmp_path / "images" / "exp1" / "Plate1"
        folder.mkdir(parents=True, exist_ok=True)
        sites[(address, site)] = image = blob_site(rng, centres)
        for c in range(3):
            Image.fromarray(image[c]).save(folder / f"{address}_s{site}_w{c + 1}.png")
    pd.DataFrame([{"well_id": f"exp1_1_{a}", "experiment_name": "exp1", "plate": 1, "address": a, "gene": g}
                  for a, g in [("A01", "EMPTY_control"), ("B02", "GENE1")]]).to_csv(tmp_path / "metadata.csv",
                                                                                    index=False)
    table = cp_module.cellprofiler_table(str(tmp_path), channels=3, num_workers=2)
    assert table.gene.tolist() == ["EMPTY_control", "GENE1"]
    names = table.attrs["feature_names"]
    cells = pd.concat([cp_module.site_cell_features(sites[("A01", 1)]), cp_module.site_cell_features(sites[("A01", 2)])])
    column = names.index("Cells_AreaShape_Area")
    assert table[f"feature_{column}"].iloc[0] == pytest.approx(cells["Cells_AreaShape_Area"].median())
    assert len(names) + len(table.attrs["dropped_features"]) == cells.shape[1]



def test_cellprofiler_measures_a_seeded_subset_of_cells_exactly_as_measured_among_all():
    """max_cells keeps a seeded draw of the segmented cells: each kept cell's row equals its row when every cell
    is measured (cp-measure measures each object on its own pixels), and the draw changes with the seed."""
    pytest.importorskip("skimage")
    pytest.importorskip("cp_measure")
    rng = np.random.default_rng(14)
    centres = [(14, 14), (14, 50), (14, 84), (50, 20), (50, 60), (84, 30), (84, 76)]
    site = blob_site(rng, centres, size=100)
    every = cp_module.site_cell_features(site)
    _, cells = cp_module.segment_site(site)
    ids = np.unique(cells[cells > 0])
    assert len(every) == len(ids) == len(centres)
    drawn = []
    for seed in (0, 1, 2):
        some = cp_module.site_cell_features(site, max_cells=3, seed=[seed, 5])
        kept = np.sort(np.random.default_rng([seed, 5]).choice(ids, 3, replace=False))
        rows = np.searchsorted(ids, kept)
        assert list(some.columns) == list(every.columns) and len(some) == 3
        np.testing.assert_allclose(some.to_numpy(), every.iloc[rows].to_numpy(), rtol=1e-9, atol=1e-12)
        drawn.append(tuple(rows))
    assert len(set(drawn)) > 1
    assert len(cp_module.site_cell_features(site, max_cells=50)) == len(centres)   # fewer cells than asked: all


def test_cellprofiler_table_subset_and_worker_processes(tmp_path):
    """The table from 2 forked worker processes equals the in-process one; cells_per_site caps the cells of a
    site (recorded in the table's attrs); a bad count is one clear error."""
    pytest.importorskip("skimage")
    pytest.importorskip("cp_measure")
    from PIL import Image

    rng = np.random.default_rng(15)
    folder = tmp_path / "images" / "exp1" / "Plate1"
    folder.mkdir(parents=True)
    rows = []
    for k, address in enumerate(["A01", "A02", "B01", "B02"]):
        image = blob_site(rng, [(20, 20), (20, 70), (70, 25), (70, 72)][: 2 + k % 3])
        for c in range(3):
            Image.fromarray(image[c]).save(folder / f"{address}_s1_w{c + 1}.png")
        rows.append({"well_id": f"exp1_1_{address}", "experiment_name": "exp1", "plate": 1, "address": address,
                     "gene": "EMPTY_control" if k == 0 else f"GENE{k}"})
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    one = cp_module.cellprofiler_table(str(tmp_path), channels=3, num_workers=1, cells_per_site=2, seed=3)
    two = cp_module.cellprofiler_table(str(tmp_path), channels=3, num_workers=2, cells_per_site=2, seed=3)
    pd.testing.assert_frame_equal(one, two)
    assert one.attrs["cells_per_site"] == 2 and one.attrs["cells_per_well_median"] == 2
    every = cp_module.cellprofiler_table(str(tmp_path), channels=3, num_workers=2)
    assert every.attrs["cells_per_site"] is None and every.attrs["cells_per_well_median"] == 2.5   # 2, 3, 4, 2 cells
    with pytest.raises(EvaluationInputError, match="cells_per_site must be >= 1, got 0"):
        cp_module.cellprofiler_table(str(tmp_path), channels=3, cells_per_site=0)

def test_cellprofiler_missing_package_is_one_clear_line(monkeypatch):
    real = importlib.import_module

    def no_cp_measure(name, *args):
        if name.startswith("cp_measure"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(cp_module.importlib, "import_module", no_cp_measure)
    with pytest.raises(EvaluationInputError, match="needs the optional package cp-measure.*pip install cp-measure"):
        cp_module.site_cell_features(np.zeros((3, 8, 8), np.uint8))


def test_evaluate_takes_a_cellprofiler_table():
    frame, pairs, _ = planted(seed=13)
    cellprofiler = frame.copy()
    features = [c for c in frame.columns if c.startswith("feature_")]
    cellprofiler[features] = cellprofiler[features].to_numpy() * 2.0 + 1.0                # same information
    result = evaluate(frame, {"cpx": pairs}, baselines=("cellprofiler",), cellprofiler=cellprofiler,
                      config=EvalConfig(map_metrics=False))
    recalls = result.recall_table()["cpx"]
    assert recalls["cellprofiler"] == pytest.approx(recalls["model"], abs=1e-6)
    with pytest.raises(EvaluationInputError, match="cellprofiler baseline needs"):
        evaluate(frame, {"cpx": pairs}, baselines=("cellprofiler",))


# --------------------------------------------------------------------------- CLI

def test_cli_efaar_tvn_classes_and_map(fake_efaar, tmp_path, capsys):
    frame, _, genes = planted(seed=14)
    rename = dict(zip(genes[:4], ["A", "B", "C", "D"]))
    frame["gene"] = frame["gene"].replace(rename)
    frame.to_parquet(tmp_path / "emb.parquet")
    pd.DataFrame({"gene": ["A", "B", "C"], "class": ["texture", "texture", "intensity"]}).to_csv(
        tmp_path / "classes.csv", index=False)
    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "emb.parquet"), "--relationships", "efaar:CORUM", "efaar:stringdb",
                              "--out", str(tmp_path / "out"), "--tvn", "efaar1.0", "--baselines", "random",
                              "--random-seeds", "2", "--gene-classes", str(tmp_path / "classes.csv"),
                              "--no-heatmap"])
    assert evaluate_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "CORUM (n=2)" in out and "StringDB (n=2)" in out and "mAP (JUMP)" in out and "texture" in out
    assert "± " in out
