"""`mae-fast demo` end to end on a tiny configuration: screen -> train -> embed -> evaluate."""
import itertools
import json
import os
import re

import pandas as pd

from mae_fast.cli import main
from mae_fast.data.synthetic import PHENOTYPE_CLASSES
from mae_fast.demo import efaar_databases, recall_intervals


def test_demo_runs_end_to_end_and_loss_goes_down(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--max-steps", "30", "--batch-size", "8", "--minutes", "600"])
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
    assert len(table) == 2 * (5 * 3 + 2 + 3 + 1)  # every well of the two plates
    assert {"model", "random", "pixel-stats"} <= set(summary["recall"])
    assert "| model |" in printed and "| pixel-stats |" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| source |"))
    columns = ["planted"] + [f"{cls} (n=3)" for cls in PHENOTYPE_CLASSES]  # overall, then each class's complex
    assert all(c in header for c in columns), header
    if efaar_databases():  # the screen's genes are CORUM's, so EFAAR's real databases are columns too
        assert re.search(r"CORUM \(n=[1-9]\d*\)", header) and "StringDB (n=" in header
    assert summary["screen"]["genes"] == 17 and summary["wall_seconds"] > 0


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
    cell = r"\d\.\d{2} \[\d\.\d{2}, \d\.\d{2}\]"  # recall [95% bootstrap interval]
    assert all(re.fullmatch(cell, row.split("|")[2].strip()) for row in rows[1:])
    for name in models:  # each model's own run and table under OUT/<model>/
        table = pd.read_parquet(out / name / "embeddings.parquet")
        assert len(table) == 42 and re.search(rf"embeddings:\s+{re.escape(str(out / name / 'embeddings.parquet'))}",
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


def test_demo_checks_every_option_before_generating_anything(tmp_path, capsys):
    for argv, message in ((["--minutes", "0"], "--minutes/--seconds must be > 0"),
                          (["--batch-size", "0"], "--batch-size must be >= 1"),
                          (["--max-steps", "-3"], "--max-steps must be >= 1"),
                          (["--lr", "-1"], "--lr must be > 0"),
                          (["--device", "tpu"], "--device must be auto, cpu or cuda")):
        rc = main(["demo", "--tiny", "--out", str(tmp_path / "d")] + argv)
        assert rc == 2 and message in capsys.readouterr().err, argv
        assert not (tmp_path / "d").exists()


def test_recall_intervals_agree_with_the_evaluation():
    """The demo's intervals are built from the same hits as evaluate's recall, and bracket it."""
    import numpy as np

    from mae_fast.evaluate import evaluate

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    centres = rng.standard_normal((8, 16))
    rows, features = [], []
    for plate in (1, 2):
        for i, g in enumerate(genes + ["EMPTY_control"] * 6):
            rows.append({"gene": g, "experiment_name": "e1", "plate": plate, "well_id": f"e1_{plate}_{i}"})
            base = centres[i % 8] if g != "EMPTY_control" else np.zeros(16)
            features.append(base + 0.8 * rng.standard_normal(16))
    frame = pd.DataFrame(rows)
    frame[[f"feature_{k}" for k in range(16)]] = np.array(features)
    pairs = pd.DataFrame([(a, b) for a in genes for b in genes if a < b and int(a[1:]) % 8 == int(b[1:]) % 8],
                         columns=["entity1", "entity2"])
    result = evaluate(frame, {"groups": pairs}, baselines=("random",))
    intervals = recall_intervals(result)
    for source in ("model", "random"):
        value, low, high, n = intervals[source]["groups"]
        assert value == result.recall_table()["groups"][source] and n == len(pairs)
        assert low <= value <= high and high - low > 0
    assert intervals["model"]["groups"][1] > intervals["random"]["groups"][2]  # planted structure beats random
