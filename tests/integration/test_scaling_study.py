"""benchmarks/scaling_study.py at toy size (the study itself is about an hour and not run in CI): the grid of runs,
the JSON (per run: FLOPs, loss, per-block recall per phenotype class and activity mAP, the headline block) and
the PNG it writes."""
import json

import pytest

from tests.helpers import load_benchmark_script


def test_study_grid_spans_sizes_budgets_and_the_ablations():
    study = load_benchmark_script("scaling_study")
    args = study.parse_args([])
    assert max(args.crops) / min(args.crops) >= 30 and len(args.presets) >= 3
    runs = study.study_runs(args)
    grid = [r for r in runs if r["label"] == "grid"]
    assert len(grid) == len(args.crops) + (len(args.presets) - 1) * len(args.crops_other)
    assert {r["preset"] for r in grid} == set(args.presets)
    extra = {r["label"]: r for r in runs if r["label"] != "grid"}
    assert set(extra) == {"fourier weight 0", "mask ratio 0.5", "patch 8", "untrained"}
    micro = args.presets[0]
    assert (extra["fourier weight 0"]["preset"], extra["fourier weight 0"]["model"]) == (micro, {"fourier_alpha": 0.0})
    assert extra["fourier weight 0"]["crops"] == args.ablation_crops in args.crops  # beside a grid point
    assert extra["mask ratio 0.5"]["model"] == {"mask_ratio": 0.5}
    assert extra["patch 8"]["preset"] == micro.replace("patch16", "patch8")
    assert extra["patch 8"]["crops"] == args.ablation_crops // 4 and extra["untrained"]["crops"] == 0
    assert len(study.study_runs(study.parse_args(["--ablations", "none"]))) == len(grid)
    assert [r["label"] for r in study.study_runs(study.parse_args(["--ablations", "fourier"]))][-1] == \
        "fourier weight 0"
    for bad in (["--crops", "0,5"], ["--ablations", "dropout"]):
        with pytest.raises(SystemExit):
            study.parse_args(bad)


def test_toy_study_writes_json_and_png(tmp_path, capsys):
    study = load_benchmark_script("scaling_study")
    out_json, out_png = tmp_path / "study.json", tmp_path / "study.png"
    rc = study.main(["--toy", "--batch-size", "4", "--amp", "fp32", "--out", str(tmp_path / "work"),
                     "--json", str(out_json), "--png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    runs = result["runs"]
    assert [(r["label"], r["crops"]) for r in runs] == [("grid", 4), ("grid", 8), ("fourier weight 0", 8),
                                                         ("mask ratio 0.5", 8), ("patch 8", 2), ("untrained", 0)]
    assert runs[0]["train_flops"] * 2 == runs[1]["train_flops"] > 0  # FLOPs follow the crops
    assert runs[-1]["train_flops"] == 0 and runs[-1]["loss_last"] is None  # untrained: embedded as initialised
    assert runs[4]["preset"] == "mae_vit_micro_patch8_256"
    for run in runs:
        assert run["steps"] == -(-run["crops"] // 4) and set(run["blocks"]) == {"1", "2", "3", "4"}
        assert run["headline_block"] in (1, 2, 3, 4) and run["last_block"] == 4
        planted = run["blocks"]["4"]["recall"]["planted"]
        assert {"all", "intensity", "texture", "localisation"} <= set(planted)
        assert 0 <= planted["all"]["low"] <= planted["all"]["recall"] <= planted["all"]["high"] <= 1
    assert set(result["baselines"]) == {"random", "pixel-stats"} and result["toy"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "run_00").exists()  # work folders removed unless --keep
    printed = capsys.readouterr().out
    assert "run 6/6:" in printed
    table = (tmp_path / "study.md").read_text()  # the markdown table beside the JSON, also printed
    assert table in printed and table.count("\n") == 2 + sum(1 + (r["headline_block"] != r["last_block"])
                                                               for r in runs) + len(result["baselines"])


def test_table_marks_a_class_without_a_recall():
    study = load_benchmark_script("scaling_study")
    recall = {"planted": {"all": {"recall": 0.2, "low": 0.1, "high": 0.3}, "texture": {"recall": None},
                          "shape": {"recall": 0.25}}}
    run = {"preset": "mae_vit_micro_patch16_256", "label": "grid", "crops_trained": 16, "train_flops": 1e9,
           "loss_last": 1.0, "last_block": 1, "headline_block": 1,
           "blocks": {"1": {"recall": recall, "activity_map": 0.5}}}
    row = study.study_table({"runs": [run], "baselines": {}}).splitlines()[2].split(" | ")
    classes = dict(zip(study.CLASSES, row[7:12]))
    assert classes["texture"] == "n/a" and classes["shape"] == "0.25" and classes["intensity"] == ""
