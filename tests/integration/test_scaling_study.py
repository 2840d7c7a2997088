"""benchmarks/scaling_study.py at toy size (the study itself is ~90 minutes and not run in CI): the grid of runs,
the JSON (per run: FLOPs, loss, per-block recall per phenotype class and activity mAP, the headline block) and
the PNG it writes."""
import json

import pytest

from tests.helpers import load_benchmark_script


def test_study_grid_spans_sizes_budgets_and_the_fourier_weight():
    study = load_benchmark_script("scaling_study")
    args = study.parse_args([])
    assert max(args.crops) / min(args.crops) >= 30 and len(args.presets) >= 3
    runs = study.study_runs(args)
    assert len(runs) == len(args.presets) * len(args.crops) + 1
    extra = runs[-1]
    assert (extra["preset"], extra["crops"], extra["fourier_alpha"]) == (args.presets[0], max(args.crops), 0.0)
    assert len(study.study_runs(study.parse_args(["--fourier-preset", "none"]))) == len(runs) - 1
    with pytest.raises(SystemExit):
        study.parse_args(["--crops", "0,5"])


def test_toy_study_writes_json_and_png(tmp_path, capsys):
    study = load_benchmark_script("scaling_study")
    out_json, out_png = tmp_path / "study.json", tmp_path / "study.png"
    rc = study.main(["--toy", "--batch-size", "4", "--amp", "fp32", "--out", str(tmp_path / "work"),
                     "--json", str(out_json), "--png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    runs = result["runs"]
    assert [(r["crops"], r["fourier_alpha"]) for r in runs] == [(4, 0.01), (8, 0.01), (8, 0.0)]
    assert runs[0]["train_flops"] * 2 == runs[1]["train_flops"] > 0  # FLOPs follow the crops
    for run in runs:
        assert run["steps"] == run["crops"] // 4 and set(run["blocks"]) == {"1", "2", "3", "4"}
        assert run["headline_block"] in (1, 2, 3, 4) and run["last_block"] == 4
        planted = run["blocks"]["4"]["recall"]["planted"]
        assert {"all", "intensity", "texture", "localisation"} <= set(planted)
        assert 0 <= planted["all"]["low"] <= planted["all"]["recall"] <= planted["all"]["high"] <= 1
    assert set(result["baselines"]) == {"random", "pixel-stats"} and result["toy"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "run_00").exists()  # work folders removed unless --keep
    assert "run 3:" in capsys.readouterr().out
