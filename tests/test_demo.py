"""`mae-fast demo` end to end on a tiny configuration: screen -> train -> embed -> evaluate."""
import json
import os
import re

import pandas as pd

from mae_fast.cli import main


def test_demo_runs_end_to_end_and_loss_goes_down(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--max-steps", "30", "--batch-size", "8", "--seconds", "300"])
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
