"""`mae-fast demo` end to end on a tiny configuration: screen -> train -> embed -> evaluate."""
import itertools
import json
import os
import re

import pandas as pd

from mae_fast.cli import main


def test_demo_runs_end_to_end_and_loss_goes_down(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--max-steps", "30", "--batch-size", "8", "--seconds", "36000"])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = {
        "loss curve": out / "train" / "loss_curve.png",
        "reconstruction": out / "train" / "recon" / "step_00000030.png",
        "embeddings": out / "embeddings.parquet",
        "curve": out / "evaluation" / "recall_curve.png",
        "heatmap": out / "evaluation" / "similarity_heatmap.png",
        "markdown": out / "evaluation" / "recall.md",
        "summary": out / "demo_summary.json",
    }
    for label, path in expected.items():
        assert os.path.getsize(path) > 100, label
        assert re.search(rf"{label}:\s+{re.escape(str(path))}", printed), label  # the demo says where it is
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 30 and len(summary["losses"]) == 30
    assert summary["loss_last"] < summary["loss_first"]
    table = pd.read_parquet(out / "embeddings.parquet")
    assert len(table) == 12 + 4 + 12 + 4  # every well of the two plates
    assert {"model", "random", "pixel-stats"} <= set(summary["recall"])
    assert "| model |" in printed and "| pixel-stats |" in printed


def test_demo_compares_models_side_by_side(tmp_path, capsys):
    out = tmp_path / "demo"
    models = ["mae_vit_micro_patch16_256", "wsl_densenet_micro_256", "munet_micro_256"]
    rc = main(["demo", "--tiny", "--out", str(out), "--models", ",".join(models), "--max-steps", "2",
               "--batch-size", "4", "--seconds", "36000"])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| source"))     # the recall table
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[first:])
            if not line.startswith("|---")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["source"] + models + ["random", "pixel-stats"]  # one table, every model side by side
    # recall [bootstrap interval]; random: mean ± sd over seeds [interval]
    assert all(re.fullmatch(r"\d\.\d{3}( ± \d\.\d{3})? \[\d\.\d{3}, \d\.\d{3}\]", row.split("|")[2].strip())
               for row in rows[1:])
    for name in models:  # each model's own run and table under OUT/<model>/
        table = pd.read_parquet(out / name / "embeddings.parquet")
        assert len(table) == 32 and re.search(rf"embeddings:\s+{re.escape(str(out / name / 'embeddings.parquet'))}",
                                              printed)
        assert os.path.getsize(out / name / "train" / "loss_curve.png") > 100
    assert (out / "munet_micro_256" / "train" / "recon" / "step_00000002.png").exists()
    assert not (out / "wsl_densenet_micro_256" / "train" / "recon").exists()  # a classifier does not reconstruct
    combined = (out / "recall.md").read_text()
    assert all(f"| {name} |" in combined for name in models + ["random", "pixel-stats"])
    assert re.search(rf"recall table:\s+{re.escape(str(out / 'recall.md'))}", printed)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary["models"]) == models and set(summary["recall"]) == set(models) | {"random", "pixel-stats"}
    assert summary["models"]["wsl_densenet_micro_256"]["steps"] == 2


def test_demo_refuses_unknown_models(tmp_path, capsys):
    rc = main(["demo", "--tiny", "--out", str(tmp_path / "d"), "--models", "mae_vit_micro_patch16_256,resnet50"])
    assert rc == 2 and "unknown model preset(s) resnet50" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
