"""`mae-fast demo` end to end on a tiny configuration."""
import json
import os

from mae_fast.cli import main


def test_demo_runs_and_loss_goes_down(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--max-steps", "24", "--batch-size", "4", "--seconds", "300"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("loss_curve.png", "reconstruction.png", "demo_summary.json"):
        assert os.path.getsize(out / name) > 1000 or name.endswith(".json")
        assert str(out / name) in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 24
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
