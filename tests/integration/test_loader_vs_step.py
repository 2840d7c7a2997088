"""The train stage's loader-vs-step measurement (benchmarks/headline.py `loader_vs_step`) at toy size on the CPU:
the synthetic screen packed uncompressed, read by the stream `mae-fast train` builds, its crops/s written beside
the step's with the ratio computed from the two and the target; rendered into results.md. No speed is asserted."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import load_benchmark_script

PRESET = "mae_vit_micro_patch8_256:img_size=64"


@pytest.fixture(scope="module")
def headline():
    return load_benchmark_script("headline")


def _measure(headline, tmp_path, step_crops_per_s):
    path = tmp_path / "train.json"
    writer = headline.Writer(str(path), headline.new_payload("train", torch.device("cpu")))
    # 4 generated sites, at most 4 batches of 2 crops, no minimum time
    entry = headline.loader_vs_step(writer, torch.device("cpu"), None, PRESET, 2, step_crops_per_s, sizes=(4, 4, 0.0))
    with open(path) as f:
        saved = json.load(f)
    return entry, saved


def test_loader_crops_per_s_are_written_beside_the_step_with_the_ratio(headline, tmp_path):
    from mae_fast.data.loader import _auto_workers

    entry, saved = _measure(headline, tmp_path, step_crops_per_s=7.0)
    assert saved["loader"] == json.loads(json.dumps(entry))
    timing = entry["timing"]
    assert entry["status"] == "ok" and entry["crop"] == 64 and entry["channels"] == 6 and entry["codec"] == "raw"
    assert timing["batches"] == 4 and timing["crops"] == 8  # the step's batch, 4 batches
    assert entry["loader_crops_per_s"] == timing["steady_crops_per_s"] > 0
    assert entry["step_crops_per_s"] == 7.0
    ratio = entry["loader_vs_step"]
    assert ratio["value"] == pytest.approx(entry["loader_crops_per_s"] / 7.0)
    assert ratio["target"] == 1.5 and ratio["verdict"] == ("met" if ratio["value"] >= 1.5 else "not met")
    # what `mae-fast train` uses: site = crop gives 1 crop per site, its default workers, the torch path here
    assert entry["crops_per_image"] == 1 and entry["workers"] == _auto_workers(None) and entry["backend"] == "torch"
    assert entry["pinned"] is False and entry["device"] == "cpu"
    # the few generated sites repeat so that one epoch holds every timed batch and one more
    assert entry["generated_sites"] == 4 and entry["sites_in_epoch"] == 4 * entry["site_repeats"] >= (4 + 1) * 2

    saved["headline"] = {"preset": PRESET, "fused_crops_per_s": 7.0, "mfu": None, "fused_vs_reference": None,
                         "fused_vs_peer": None, "loader_vs_step": entry["loader_vs_step"]}
    with open(tmp_path / "train.json", "w") as f:
        json.dump(saved, f)
    md = headline.render(str(tmp_path))
    line = next(x for x in md.splitlines() if x.startswith("- data path"))
    assert f"batch 2): {headline._fmt(entry['loader_crops_per_s'])} crops/s to cpu" in line
    assert "4 synthetic sites x" in line and "raw pack" in line and "(target >= 1.5: " in line


def test_without_a_step_measurement_the_ratio_is_not_measured(headline, tmp_path):
    entry, _ = _measure(headline, tmp_path, step_crops_per_s=None)
    assert entry["loader_crops_per_s"] > 0
    assert entry["loader_vs_step"] == {"value": None, "target": 1.5, "verdict": None}


def test_the_generated_screen_is_packed_uncompressed(tmp_path):
    bench_data = load_benchmark_script("bench_data")
    pack_dir = bench_data.synthetic_pack(str(tmp_path), 64, channels=3, unique_sites=5, workers=1)
    with open(os.path.join(pack_dir, "pack.json")) as f:
        manifest = json.load(f)
    assert manifest["codec"] == "raw" and manifest["n_sites"] == 5 and len(manifest["channels"]) == 3
    with pytest.raises(ValueError, match="unique_sites"):
        bench_data.synthetic_pack(str(tmp_path / "x"), 64, unique_sites=3)
