"""The built-in synthetic screen (v2, docs/SYNTHETIC_SCREEN.md): RxRx3 layout, determinism, real complexes and
their phenotype classes, histogram invariance of the texture and localisation classes, and every nuisance."""
import filecmp
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mae_fast.data import synthetic
from mae_fast.evaluation.databases import corum_complexes
from mae_fast.data.synthetic import (
    AXIS, BUILTIN_COMPLEXES, HISTOGRAM_INVARIANT_CLASSES, METADATA_COLUMNS, NEGATIVE_CONTROLS, PHENOTYPE_AXES,
    PHENOTYPE_CLASSES, SiteNuisance, SyntheticScreenConfig, draw_plate_nuisance, draw_site_nuisance,
    make_synthetic_screen, plan_screen, render_site,
)

TINY = dict(n_experiments=1, n_plates=2, n_complexes=5, complex_size=3, n_singletons=2, n_empty_controls=2,
            n_crispr_controls=1, site_size=128, cells_per_site=20, complex_source="builtin")
N_AXES = len(PHENOTYPE_AXES)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), SyntheticScreenConfig(**TINY, bit_depth=16))


def test_layout_is_rxrx3(screen):
    meta = pd.read_csv(screen.metadata_csv)
    assert tuple(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 2 * (5 * 3 + 2 + 2 + 1)
    assert meta.well_id.is_unique
    assert set(meta.gene) >= set(NEGATIVE_CONTROLS)
    assert (meta.perturbation_type == "CRISPR").all()
    for row in meta.itertuples():
        assert row.well_id == f"{row.experiment_name}_{row.plate}_{row.address}"
        for c in range(1, 7):
            path = os.path.join(screen.root, "images", row.experiment_name, f"Plate{row.plate}",
                                f"{row.address}_s1_w{c}.png")
            assert os.path.exists(path), path
    img = Image.open(path)
    arr = np.asarray(img)
    assert img.mode == "I;16" and arr.shape == (128, 128)
    assert arr.max() > 255  # really 16-bit data
    treated = meta[~meta.gene.isin(NEGATIVE_CONTROLS)]
    guides = treated.treatment.str.rsplit("_", n=1).str[1].astype(int)
    assert set(guides[treated.plate == 1]) == {1} and set(guides[treated.plate == 2]) == {2}  # one guide per plate


def test_complexes_classes_and_relationships_are_written(screen):
    rel = pd.read_csv(screen.relationships_csv)
    assert list(rel.columns) == ["entity1", "entity2"]
    assert len(rel) == 5 * 3  # five complexes of three genes: 3 pairs each
    assert (rel.entity1 < rel.entity2).all()
    arms = pd.read_csv(screen.arms_csv)
    assert list(arms.columns) == ["gene", "chromosome_arm", "expressed"]
    assert set(arms.gene) == set(screen.genes)
    genes = pd.read_csv(screen.genes_csv, keep_default_na=False)
    assert list(genes.gene) == screen.genes
    assert set(genes.phenotype_class) <= set(PHENOTYPE_CLASSES)
    info = json.loads(open(screen.screen_json).read())
    assert info["complex_source"] == "builtin" and info["complex_source_path"] is None
    assert info["class_mix"] == {cls: 1 for cls in PHENOTYPE_CLASSES}  # round-robin: one complex per class
    builtin = dict(BUILTIN_COMPLEXES)
    per_class = {}
    for cpx in info["complexes"]:
        assert set(cpx["genes"]) <= set(builtin[cpx["name"]])  # real subunits of the named complex
        assert set(genes.set_index("gene").loc[cpx["genes"], "phenotype_class"]) == {cpx["phenotype_class"]}
        per_class[cpx["phenotype_class"]] = cpx["genes"]
    for cls, path in screen.class_relationships.items():  # one planted-pairs file per class, with its pairs only
        pairs = pd.read_csv(path)
        assert set(pairs.entity1) | set(pairs.entity2) == set(per_class[cls]) and len(pairs) == 3
    guides = pd.read_csv(os.path.join(screen.root, "guides.csv"))
    assert len(guides) == len(screen.genes) * screen.config.n_guides and guides.efficacy.between(0, 1).all()


def test_deterministic_by_seed(tmp_path):
    a = make_synthetic_screen(str(tmp_path / "a"), SyntheticScreenConfig(**TINY, seed=5))
    b = make_synthetic_screen(str(tmp_path / "b"), SyntheticScreenConfig(**TINY, seed=5), workers=1)
    c = make_synthetic_screen(str(tmp_path / "c"), SyntheticScreenConfig(**TINY, seed=6))
    for name in ("metadata.csv", "genes.csv", "guides.csv", "gene_arms.csv", "relationships/planted_complexes.csv"):
        assert filecmp.cmp(os.path.join(a.root, name), os.path.join(b.root, name), shallow=False), name
    rel = os.path.relpath(os.path.join(a.images_dir, "synth-001", "Plate1"), a.root)
    files = sorted(os.listdir(os.path.join(a.root, rel)))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(a.root, rel), os.path.join(b.root, rel), files,
                                               shallow=False)
    assert not mismatch and not errors and len(match) == len(files)  # threads or not, the same bytes
    assert not filecmp.cmp(a.metadata_csv, c.metadata_csv, shallow=False)
    assert a.genes != c.genes


def test_default_screen_is_large_and_real():
    plan = plan_screen(SyntheticScreenConfig())
    assert len(plan.complexes) >= 24 and len(plan.genes) >= 150
    assert len(set(plan.genes)) == len(plan.genes)
    builtin = plan_screen(SyntheticScreenConfig(complex_source="builtin"))
    assert len(builtin.complexes) >= 24 and len(builtin.genes) >= 150 and builtin.source == "builtin"
    assert {c: builtin.complex_classes.count(c) for c in PHENOTYPE_CLASSES} == {c: 6 for c in PHENOTYPE_CLASSES}


def test_corum_source_when_efaar_benchmarking_is_installed():
    path = synthetic.corum_clusters_path()
    if path is None:
        pytest.skip("efaar-benchmarking (CORUM_clusters.tsv) is not installed")
    plan = plan_screen(SyntheticScreenConfig(complex_source="corum"))
    assert plan.source == "corum" and plan.source_path == path
    clusters = corum_complexes(os.path.dirname(path))
    for name, members in zip(plan.complex_names, plan.complexes):
        assert set(members) <= set(clusters[name])
    used = [g for m in plan.complexes for g in m]
    assert len(used) == len(set(used))  # chosen complexes share no gene


def test_auto_falls_back_to_builtin_and_corum_demands_the_package(monkeypatch):
    monkeypatch.setattr(synthetic, "corum_clusters_path", lambda: None)
    assert plan_screen(SyntheticScreenConfig(n_complexes=3, n_singletons=2)).source == "builtin"
    with pytest.raises(ValueError, match="efaar-benchmarking"):
        plan_screen(SyntheticScreenConfig(complex_source="corum"))


def test_members_share_a_phenotype_inside_their_class():
    plan = plan_screen(SyntheticScreenConfig(complex_source="builtin"))
    phen = plan.phenotypes
    assert np.all(phen["EMPTY_control"] == 0)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    within = [cos(plan.knockout[a], plan.knockout[b]) for c in plan.complexes for a in c for b in c if a < b]
    assert np.mean(within) > 0.95
    for members, cls in zip(plan.complexes, plan.complex_classes):
        outside = [AXIS[a] for a in PHENOTYPE_AXES if a not in PHENOTYPE_CLASSES[cls]]
        assert all(np.all(plan.knockout[g][outside] == 0) for g in members)  # a class moves its own axes only


# --------------------------------------------------------------------------- histogram invariance

def _quantised(image):
    return np.round(image * 255)


def _well_and_twin(cls, seed=11):
    """An 8-bit site of a strong `cls` phenotype and its control twin: same seed, same nuisances."""
    cfg = SyntheticScreenConfig()
    plate = draw_plate_nuisance(cfg, np.random.default_rng(seed))
    nuisance = draw_site_nuisance(cfg, plate, np.random.default_rng(seed + 1))
    nuisance.blur_sigma = 1.0
    phenotype = np.zeros(N_AXES)
    phenotype[[AXIS[a] for a in PHENOTYPE_CLASSES[cls]]] = np.random.default_rng(seed).choice([-2.0, 2.0],
                                                                                            len(PHENOTYPE_CLASSES[cls]))
    well = _quantised(render_site(phenotype, [seed], nuisance=nuisance))
    twin = _quantised(render_site(np.zeros(N_AXES), [seed], nuisance=nuisance))
    return well, twin


@pytest.mark.parametrize("cls", HISTOGRAM_INVARIANT_CLASSES)
@pytest.mark.parametrize("seed", [11, 12])
def test_texture_and_localisation_leave_each_channel_histogram_unchanged(cls, seed):
    """The stated tolerance (docs/SYNTHETIC_SCREEN.md): mean and std within 0.5%, percentiles within 1 grey level."""
    well, twin = _well_and_twin(cls, seed)
    q = [1, 5, 25, 50, 75, 95, 99]
    for c in range(6):
        assert abs(well[c].mean() - twin[c].mean()) <= 0.005 * twin[c].mean(), (cls, c)
        assert abs(well[c].std() - twin[c].std()) <= 0.005 * twin[c].std(), (cls, c)
        assert np.abs(np.percentile(well[c], q) - np.percentile(twin[c], q)).max() <= 1, (cls, c)
    changed = [c for c in range(6) if np.abs(well[c] - twin[c]).mean() > 2]
    assert changed, "the phenotype moved no pixel"  # the arrangement did change: the test is not vacuous


def test_intensity_and_size_classes_do_change_the_histogram():
    for cls in ("intensity", "size_count"):
        well, twin = _well_and_twin(cls)
        assert max(abs(well[c].mean() / twin[c].mean() - 1) for c in range(6)) > 0.05, cls


# --------------------------------------------------------------------------- nuisances

def _site(nuisance, phenotype=None, seed=3, size=128):
    return render_site(np.zeros(N_AXES) if phenotype is None else phenotype, [seed], size=size, nuisance=nuisance)


def _quiet(**changes):
    base = SiteNuisance.identity(6)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_plate_gain_and_offset_scale_each_channel():
    cfg = SyntheticScreenConfig()
    plate = draw_plate_nuisance(cfg, np.random.default_rng(0))
    assert np.ptp(plate["gain"]) > 0.05 and np.ptp(plate["offset"]) > 0.005
    off = draw_plate_nuisance(SyntheticScreenConfig(plate_gain_spread=0), np.random.default_rng(0))
    assert np.all(off["gain"] == 1)
    plain = _site(_quiet())
    gained = _site(_quiet(gain=plate["gain"], offset=plate["offset"]))
    expected = (plain - 0.03) * plate["gain"][:, None, None] + plate["offset"][:, None, None]
    np.testing.assert_allclose(gained, np.clip(expected, 0, 1), atol=1e-5)


def test_vignetting_darkens_the_corners():
    cfg = SyntheticScreenConfig()
    plate = draw_plate_nuisance(cfg, np.random.default_rng(0))
    assert plate["vignetting"].min() > 0
    assert np.all(draw_plate_nuisance(SyntheticScreenConfig(vignetting=0), np.random.default_rng(0))["vignetting"] == 0)
    plain = _site(_quiet()) - 0.03
    vignetted = _site(_quiet(vignetting=plate["vignetting"], centre=plate["centre"])) - 0.03
    ratio = vignetted / plain
    assert ratio[:, 60:68, 60:68].mean() > 0.97 and ratio[:, :6, :6].mean() < 1 - 0.8 * plate["vignetting"].min()


def test_focus_blur_removes_fine_detail():
    cfg = SyntheticScreenConfig()
    sigmas = [draw_site_nuisance(cfg, draw_plate_nuisance(cfg, np.random.default_rng(0)),
                                 np.random.default_rng(k)).blur_sigma for k in range(20)]
    assert min(sigmas) >= 0.3 and np.ptp(sigmas) > 0.2
    off = SyntheticScreenConfig(focus_blur=False)
    assert draw_site_nuisance(off, draw_plate_nuisance(off, np.random.default_rng(0)),
                              np.random.default_rng(1)).blur_sigma == 0

    def detail(image):
        return np.abs(np.diff(image, axis=-1)).mean()

    assert detail(_site(_quiet(blur_sigma=2.0))) < 0.6 * detail(_site(_quiet()))


def test_cell_density_varies_per_well():
    cfg = SyntheticScreenConfig()
    plate = draw_plate_nuisance(cfg, np.random.default_rng(0))
    factors = [draw_site_nuisance(cfg, plate, np.random.default_rng(k)).density for k in range(30)]
    assert np.std(np.log(factors)) > 0.1
    off = SyntheticScreenConfig(density_cv=0)
    assert draw_site_nuisance(off, plate, np.random.default_rng(1)).density == 1.0

    def foreground(image):
        return (image[0] > image[0].mean()).mean()

    sparse = np.mean([foreground(_site(_quiet(density=0.6), seed=s, size=256)) for s in range(4)])
    dense = np.mean([foreground(_site(_quiet(density=1.6), seed=s, size=256)) for s in range(4)])
    assert dense > 1.3 * sparse


def test_guides_differ_in_efficacy():
    plan = plan_screen(SyntheticScreenConfig(complex_source="builtin"))
    efficacy = np.stack([plan.guide_efficacy[g] for g in plan.genes])
    assert efficacy.std() > 0.1 and (efficacy <= 0.1).any()
    g = plan.genes[0]
    knockout = plan.well_phenotype(g, 1) - plan.arm_shift[g]
    np.testing.assert_allclose(knockout, plan.knockout[g] * efficacy[0, 0])
    same = plan_screen(SyntheticScreenConfig(complex_source="builtin", guide_efficacy=False))
    assert np.all(np.stack([same.guide_efficacy[g] for g in same.genes]) == 1)


def test_chromosome_arm_bias_is_shared_by_the_arm():
    plan = plan_screen(SyntheticScreenConfig(complex_source="builtin"))
    by_arm = {}
    for g in plan.genes:
        by_arm.setdefault(plan.gene_arm[g], []).append(plan.arm_shift[g])
    for shifts in by_arm.values():
        assert all(np.array_equal(s, shifts[0]) for s in shifts)
    assert len({tuple(s[0]) for s in by_arm.values()}) == len(by_arm) and np.abs(shifts[0]).max() > 0
    moved = [AXIS[a] for a in synthetic.ARM_AXES]
    assert np.all(np.delete(shifts[0], moved) == 0)  # a cut shifts proliferation-like axes only
    g = plan.genes[0]
    cut_only = plan.well_phenotype(g, 1) - plan.knockout[g] * plan.guide_efficacy[g][0]
    np.testing.assert_allclose(cut_only, plan.arm_shift[g])  # every well of the gene carries its arm's shift
    flat = plan_screen(SyntheticScreenConfig(complex_source="builtin", arm_effect=0))
    assert all(np.all(flat.arm_shift[g] == 0) for g in flat.genes)


def test_noise_is_shot_plus_read_noise():
    quiet, noisy = _site(_quiet()), _site(_quiet(noise=True))
    residual = noisy - quiet
    assert 0.003 < residual.std() < 0.02
    bright, background = quiet > 0.3, quiet < 0.06   # background: autofluorescence 0.02 + camera offset 0.03
    assert bright.sum() > 100 and background.sum() > 100
    assert residual[bright].std() > 1.4 * residual[background].std()  # shot noise grows with the signal


def test_phenotype_changes_pixels():
    base = _site(_quiet(), size=256)
    big_nuclei = _site(_quiet(), phenotype=np.eye(N_AXES)[AXIS["nucleus_size"]] * 3, size=256)
    assert base.shape == (6, 256, 256) and base.dtype == np.float32
    assert 0 <= base.min() and base.max() <= 1
    assert big_nuclei[0].mean() > base[0].mean() * 1.1  # more DNA signal



def _cells_one_by_one(z, cell_rng, size, cells):
    """The cell geometry drawn the plain way, one cell at a time into windows clipped to the site: the reference
    for `synthetic._cell_geometry`, which renders batches of cells into a padded canvas."""
    area = (size / 256.0) ** 2
    n_cells = max(1, int(cell_rng.poisson(cells * area * (1 + 0.5 * z[AXIS["density"]]))))
    r_nuc, r_cell = 9.0 * (1 + 0.3 * z[AXIS["nucleus_size"]]), 20.0 * (1 + 0.3 * z[AXIS["cell_size"]])
    aspect, irregular = 1.5 * np.exp(0.5 * z[AXIS["elongation"]]), 0.12 * (1 + z[AXIS["nuclear_irregularity"]])
    nucleus, cell, membrane, golgi, rho = (np.zeros((size, size), np.float32) for _ in range(5))
    f32 = np.float32

    def window(cy, cx, half):
        y0, x0 = int(cy) - half, int(cx) - half
        ys = slice(max(y0, 0), max(min(y0 + 2 * half + 1, size), 0))
        xs = slice(max(x0, 0), max(min(x0 + 2 * half + 1, size), 0))
        return (ys, xs, (np.arange(ys.start, ys.stop, dtype=f32) - f32(cy))[:, None],
                (np.arange(xs.start, xs.stop, dtype=f32) - f32(cx))[None, :])

    harmonics = np.arange(2, 6)
    for _ in range(n_cells):
        cy, cx = cell_rng.uniform(0, size, 2)
        theta, golgi_angle = cell_rng.uniform(0, 2 * np.pi, 2)
        jitter, stretch = cell_rng.uniform(0.85, 1.15, 2)
        coef = cell_rng.standard_normal(4) / harmonics
        phase = cell_rng.uniform(0, 2 * np.pi, 4)
        a, rn, rc = aspect * stretch, r_nuc * jitter, r_cell * jitter
        c, s = f32(np.cos(theta)), f32(np.sin(theta))
        ys, xs, dy, dx = window(cy, cx, int(np.ceil(rc * max(a, 1.0))) + 6)
        d = np.sqrt(((c * dx + s * dy) / f32(a)) ** 2 + (-s * dx + c * dy) ** 2)
        body = 0.5 - 0.5 * np.tanh((d - f32(rc)) * f32(0.3))
        mine = body > cell[ys, xs]
        rho[ys, xs] = np.where(mine, np.clip((d - f32(rn)) / f32(rc - rn), 0, 1), rho[ys, xs])
        cell[ys, xs] = np.maximum(cell[ys, xs], body)
        membrane[ys, xs] = np.maximum(membrane[ys, xs], np.exp(f32(-0.5 / 1.5**2) * (d - f32(rc)) ** 2))
        ys, xs, dy, dx = window(cy, cx, int(np.ceil(rn * np.sqrt(max(a, 1.0)) * (1 + 2 * irregular))) + 8)
        un, v = (c * dx + s * dy) / f32(np.sqrt(a)), -s * dx + c * dy
        d = np.sqrt(un**2 + v**2)
        angle = np.arctan2(v, un)
        wobble = sum(f32(k_coef) * np.cos(k * angle + f32(k_phase)) for k, k_coef, k_phase in zip(harmonics, coef, phase))
        outline = 1 + f32(irregular / np.linalg.norm(coef)) * wobble
        nucleus[ys, xs] = np.maximum(nucleus[ys, xs], 0.5 - 0.5 * np.tanh((d - f32(rn) * outline) * f32(0.75)))
        ys, xs, gy, gx = window(cy + 1.1 * rn * np.sin(golgi_angle), cx + 1.1 * rn * np.cos(golgi_angle),
                                int(np.ceil(1.8 * rn)) + 1)
        golgi[ys, xs] = np.maximum(golgi[ys, xs], np.exp((gx**2 + gy**2) * f32(-0.5 / (0.45 * rn) ** 2)))
    return nucleus, cell, membrane, golgi, rho


@pytest.mark.parametrize("seed", range(6))
def test_batched_cell_geometry_matches_drawing_cell_by_cell(seed, monkeypatch):
    """Dense, sparse, small and elongated sites (cells cut by every border; more cells than one batch), batches
    of 16 and of 3 cells: the masks equal the cell-by-cell reference (the wobble there from cos(k angle + p))."""
    rng = np.random.default_rng(seed)
    z = np.tanh(rng.normal(0, 1.5, N_AXES))
    size, cells = [(256, 20), (128, 60), (200, 5), (64, 30), (256, 45), (97, 12)][seed]
    monkeypatch.setattr(synthetic, "CELL_CHUNK", [16, 3][seed % 2])
    got = synthetic._cell_geometry(z, np.random.default_rng([seed, 1]), size, cells)
    want = _cells_one_by_one(z, np.random.default_rng([seed, 1]), size, cells)
    for name, g, w in zip(("nucleus", "cell", "membrane", "golgi", "rho"), got, want):
        assert g.shape == (size, size) and g.dtype == np.float32, name
        np.testing.assert_allclose(g, w, atol=2e-5, err_msg=name)
    assert got[1].max() > 0.9 and got[0].max() > 0.9                   # not vacuous: cells were drawn


def test_a_rendering_process_error_reaches_the_caller(tmp_path, monkeypatch):
    """Sites are rendered in forked processes: a failure in one of them is raised by make_synthetic_screen."""
    real = synthetic.write_png

    def failing(path, array):
        if "Plate2" in path:
            raise OSError(f"{path}: disk full")
        real(path, array)

    monkeypatch.setattr(synthetic, "write_png", failing)   # forked workers inherit the patched module
    with pytest.raises(OSError, match="Plate2.*disk full"):
        make_synthetic_screen(str(tmp_path / "s"), SyntheticScreenConfig(**TINY), workers=2)

def test_bad_config():
    with pytest.raises(ValueError, match="bit_depth"):
        SyntheticScreenConfig(bit_depth=12)
    with pytest.raises(ValueError, match="channels"):
        SyntheticScreenConfig(channels=7)
    with pytest.raises(ValueError, match="complex_source"):
        SyntheticScreenConfig(complex_source="made-up")
    with pytest.raises(ValueError, match="disjoint complexes"):
        plan_screen(SyntheticScreenConfig(n_complexes=500, complex_source="builtin"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 13), (64, 257)])
def test_png_writer_round_trips_through_pillow_and_the_data_layer(tmp_path, dtype, shape):
    """The screen's own PNG writer (Sub filter, Huffman-only): every decoder reads back the exact pixels."""
    from mae_fast.data.decode import decode

    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=np.int64).astype(dtype)
    array[0, 0] = np.iinfo(dtype).max                       # the Sub filter wraps modulo 256 next to it
    path = tmp_path / "plane.png"
    synthetic.write_png(str(path), array)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), array)
    decoded = decode(path.read_bytes())
    assert decoded.dtype == dtype and np.array_equal(decoded, array)
    with pytest.raises(ValueError, match="plane.png: write_png takes a 2-D uint8 or uint16 array"):
        synthetic.write_png(str(path), array.astype(np.float32))
