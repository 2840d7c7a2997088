"""The built-in synthetic screen: RxRx3 layout, determinism, planted structure."""
import filecmp
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mae_fast.data.synthetic import (
    METADATA_COLUMNS, NEGATIVE_CONTROLS, SyntheticScreenConfig, make_synthetic_screen, plan_screen, render_site,
)

TINY = dict(n_experiments=1, n_plates=2, n_complexes=2, complex_size=3, n_singletons=2, n_empty_controls=2,
            n_crispr_controls=1, site_size=128, cells_per_site=20)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), SyntheticScreenConfig(**TINY, bit_depth=16))


def test_layout_is_rxrx3(screen):
    meta = pd.read_csv(screen.metadata_csv)
    assert tuple(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 2 * (6 + 2 + 2 + 1)
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


def test_relationships_and_arms(screen):
    rel = pd.read_csv(screen.relationships_csv)
    assert list(rel.columns) == ["entity1", "entity2"]
    assert len(rel) == 2 * 3  # two complexes of three genes: 3 pairs each
    assert (rel.entity1 < rel.entity2).all()
    arms = pd.read_csv(screen.arms_csv)
    assert list(arms.columns) == ["gene", "chromosome_arm", "expressed"]
    assert set(arms.gene) == set(screen.genes)


def test_deterministic_by_seed(tmp_path):
    a = make_synthetic_screen(str(tmp_path / "a"), SyntheticScreenConfig(**TINY, seed=5))
    b = make_synthetic_screen(str(tmp_path / "b"), SyntheticScreenConfig(**TINY, seed=5))
    c = make_synthetic_screen(str(tmp_path / "c"), SyntheticScreenConfig(**TINY, seed=6))
    assert filecmp.cmp(a.metadata_csv, b.metadata_csv, shallow=False)
    rel = os.path.relpath(os.path.join(a.images_dir, "synth-001", "Plate1"), a.root)
    files = sorted(os.listdir(os.path.join(a.root, rel)))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(a.root, rel), os.path.join(b.root, rel), files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    assert not filecmp.cmp(a.metadata_csv, c.metadata_csv, shallow=False)


def test_complex_members_share_a_phenotype_and_controls_are_neutral():
    cfg = SyntheticScreenConfig()
    complexes, genes, phen, gene_arm, expressed = plan_screen(cfg)
    assert np.all(phen["EMPTY_control"] == 0)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    within = [cos(phen[a], phen[b]) for c in complexes for a in c for b in c if a < b
              if expressed[a] and expressed[b]]
    across = [cos(phen[c1[0]], phen[c2[0]]) for i, c1 in enumerate(complexes) for c2 in complexes[i + 1:]]
    assert np.mean(within) > 0.8 > np.mean(np.abs(across))


def test_phenotype_changes_pixels():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    k = 12
    base = render_site(np.zeros(k), rng(), size=256)
    big_nuclei = render_site(np.eye(k)[0] * 4, rng(), size=256)
    assert base.shape == (6, 256, 256) and base.dtype == np.float32
    assert 0 <= base.min() and base.max() <= 1
    assert big_nuclei[0].mean() > base[0].mean() * 1.1  # more DNA signal


def test_bad_config():
    with pytest.raises(ValueError, match="bit_depth"):
        SyntheticScreenConfig(bit_depth=12)
    with pytest.raises(ValueError, match="channels"):
        SyntheticScreenConfig(channels=7)
