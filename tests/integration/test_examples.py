"""The scripts of examples/ run as a user runs them (`python examples/<name>.py --toy --out DIR`, a fresh process)
on the built-in synthetic screen at toy size, and leave what they promise."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers import ROOT

EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str, out, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(EXAMPLES, name), "--toy", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_tested():
    tested = {"embed_and_evaluate.py", "train_custom_layout.py", "export_to_timm.py"}
    assert {f for f in os.listdir(EXAMPLES) if f.endswith(".py")} == tested


def test_embed_and_evaluate(tmp_path):
    out = tmp_path / "eval"
    stdout = run_example("embed_and_evaluate.py", out)
    wells = pd.read_parquet(out / "embeddings.parquet")
    screen = pd.read_csv(out / "screen" / "metadata.csv")
    assert len(wells) == screen["well_id"].nunique() and "feature_191" in wells.columns
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert "planted" in json.dumps(evaluation)
    assert "| model |" in stdout and "| random |" in stdout and "planted" in stdout


def test_train_custom_layout(tmp_path):
    out = tmp_path / "train"
    stdout = run_example("train_custom_layout.py", out)
    sites = pd.read_csv(out / "sites.csv")
    stains = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
    assert list(sites.columns) == ["Metadata_Plate", "Metadata_Well"] + [f"FileName_Orig{s}" for s in stains]
    assert len(sites) >= 4
    for row in sites.itertuples():  # the custom layout: IMAGES/<plate>/<well>/<stain>.png
        path = row.FileName_OrigWGA
        assert os.path.exists(path) and path.endswith(os.path.join(row.Metadata_Plate, row.Metadata_Well, "WGA.png"))
    summary = json.loads((out / "run" / "train_summary.json").read_text())
    from mae_fast.checkpoint import read_config

    config = read_config(str(out / "run" / "model"))
    assert summary["steps"] == 3 and summary["crops"] == 12 and config.in_chans == 6
    assert "trained 3 steps (12 crops" in stdout


def test_export_to_timm(tmp_path):
    pytest.importorskip("timm", reason="the example exports to timm (pip install mae_fast[test])")
    from safetensors.torch import load_file

    out = tmp_path / "timm"
    stdout = run_example("export_to_timm.py", out)
    state = load_file(str(out / "model.safetensors"))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.in_proj.weight", "blocks.0.q_norm.weight",
            "norm.weight"} <= set(state)  # timm's VisionTransformer + ParallelScalingBlock names
    config = json.loads((out / "config.json").read_text())
    assert config["mae_fast_preset"] == "mae_vit_micro_patch16_256" and config["timm_kwargs"]["qk_norm"] is True
    gap = float(stdout.split("largest difference ")[1].split()[0])
    assert gap < 1e-4
