"""benchmarks/demo_curve.py at toy size: one run snapshotted twice, each snapshot embedded and evaluated; the JSON
and the PNG it writes."""
import json

import pytest

from tests.helpers import load_benchmark_script


def _curve_module():
    return load_benchmark_script("demo_curve")


def test_snapshot_times():
    curve = _curve_module()
    assert curve.snapshot_seconds(None, 600) == [60, 150, 300, 600]
    assert curve.snapshot_seconds(None, 200) == [60, 150, 200]          # the defaults up to the budget, then it
    assert curve.snapshot_seconds([0.5, 0.5, 0.1], 60) == [6, 30, 60]
    with pytest.raises(ValueError, match="reach 3 min, past the run's 2 min"):
        curve.snapshot_seconds([1, 3], 120)
    with pytest.raises(SystemExit):
        curve.parse_args(["--snapshots", "1,-2"])


def test_toy_curve_writes_json_and_png(tmp_path, capsys):
    curve = _curve_module()
    out_json, out_png = tmp_path / "curve.json", tmp_path / "curve.png"
    # a schedule of 400 steps that cannot finish: the time budget (3 s, then 4 s in all) stops each segment; the
    # second segment is short, so only a resumed run (not a fresh one) has more steps than the first snapshot
    rc = curve.main(["--tiny", "--seconds", "4", "--snapshots", str(3 / 60), "--max-steps", "400",
                     "--batch-size", "4", "--out", str(tmp_path / "work"), "--json", str(out_json),
                     "--png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    snaps = result["snapshots"]
    assert [s["target_minutes"] for s in snaps] == [pytest.approx(3 / 60, abs=1e-4), pytest.approx(4 / 60, abs=1e-4)]
    assert 0 < snaps[0]["steps"] < snaps[1]["steps"] < 400              # one run, resumed: the steps go on
    assert snaps[0]["train_minutes"] < snaps[1]["train_minutes"]
    assert result["planned_steps"] == 400 and result["preset"] == "mae_vit_micro_patch16_256"
    for snap in snaps:
        planted = snap["recall"]["planted"]
        assert {"all", "intensity", "texture", "localisation"} <= set(planted)
        overall = planted["all"]
        assert overall["n_pairs"] == 15 and 0 <= overall["low"] <= overall["recall"] <= overall["high"] <= 1
    assert set(result["baselines"]) == {"random", "pixel-stats"}
    assert result["baselines"]["random"]["planted"]["all"]["seeds"] > 1
    assert len(result["load_average_start"]) == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    assert "snapshot 2/2" in capsys.readouterr().out
