"""benchmarks/gpu.sh proven on the CPU: its dry run (MAE_FAST_GPU_DRYRUN=1, toy sizes) runs every stage and writes
every file, each well-formed, with the headline fields the GPU run will fill; `--prepare` records the commit that a
copy of the tree without .git reports. Plumbing, not speed: no timing is asserted."""
from __future__ import annotations
from tests.helpers import ROOT, load_benchmark_script

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")
FILES = ["env.json", "kernels.json", "train.json", "inference.json", "compiled.json", "tests.json", "log.txt",
         "results.md"]

# slow: six Python processes each import torch (seconds on an idle machine, a minute on a busy shared one)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="gpu.sh needs bash and coreutils' timeout")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("timm", reason="the dry run's train and inference stages include the timm peer")
    out = tmp_path_factory.mktemp("gpu_dry")
    env = dict(os.environ, MAE_FAST_GPU_DRYRUN="1", PYTHON=sys.executable)
    env.pop("STAGES", None)
    # generous limits: the stages' work is tiny, but a busy shared CPU can take a minute to import torch
    env.update(STAGE_SCALE="6", BUDGET_S="3600")
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=3700)
    return proc, out


def test_a_stage_that_writes_nothing_leaves_a_file_saying_why(tmp_path):
    """A stage killed before its first write, and a stage skipped for lack of budget, still leave well-formed files."""
    fake = tmp_path / "python"  # a "Python" that takes 10 s, writes nothing and fails
    fake.write_text("#!/bin/sh\nsleep 10\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    # 32 s: env runs (limit 27 s) and fails after 10 s; then 22 s are left, under the 20 s minimum plus margin
    env = dict(os.environ, MAE_FAST_GPU_DRYRUN="1", PYTHON=str(fake), STAGES="env kernels", BUDGET_S="32",
               STAGE_SCALE="1")
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env_json, kernels_json = _load(out, "env.json"), _load(out, "kernels.json")
    assert env_json["stage"] == "env" and env_json["status"].startswith("no result") and env_json["dryrun"] is True
    assert kernels_json["status"].startswith("skipped")


def _load(out, name):
    with open(out / name) as f:
        return json.load(f)


def test_dry_run_writes_every_file(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(FILES), proc.stdout[-3000:]
    for name in FILES[:6]:
        payload = _load(out, name)
        assert payload["schema"] == "mae_fast.headline/1" and payload["dryrun"] is True
        assert payload["status"] == "ok", (name, payload.get("error"), proc.stdout[-3000:])
        assert payload["provenance"]["git"]["commit"] not in ("", "unknown")
        assert payload["targets"]["train_fused_vs_peer"] == 1.5
    log = (out / "log.txt").read_text()
    assert "SKIPPED" not in log and "TIME LIMIT" not in log


def test_dry_run_stages_hold_the_headline(dry_run):
    _, out = dry_run
    env = _load(out, "env.json")
    assert env["matmul_ceiling"]["tflops"] > 0 and env["copy_ceiling"]["GBps"] > 0
    kernels = _load(out, "kernels.json")
    assert [e["op"] for e in kernels["ops"]] == ["masked_patchify", "unshuffle", "mae_loss", "lion_update"]
    for e in kernels["ops"]:
        assert e["correctness"]["ok"] in (True, None), e  # None: no fused backend on this machine
        assert e["cases"] and all(c["median_ms"] > 0 and c["fraction_of_floor"] > 0 for c in e["cases"])
        assert e["prediction"] == "no prediction" or "predicted_ms" in e["prediction"]
    # SDPA's backends compared at the attention shapes (toy ones here): on a CPU flash and math run, the others refuse
    attn = kernels["attention"]
    assert [e["shape"] for e in attn["shapes"]] == ["encoder, training (toy)", "MAE decoder (toy)"]
    for e in attn["shapes"]:
        assert e["fastest"] in ("flash", "math") and e["seconds"]["math"] > 0 and e["tflops"]["math"] > 0
        assert e["seconds"]["cudnn"].startswith("unavailable") and e["sdpa_own_choice_s"] > 0
    train = _load(out, "train.json")
    first = train["comparisons"][0]
    assert first["preset"].startswith("mae_vit_micro_patch8_256") and first["stacks"] == ["fused", "reference", "peer"]
    assert all(r["status"] == "ok" for r in first["records"]), first["records"]
    assert first["batch_estimate"]["method"] == "fixed on CPU"
    pairs = {(r["numerator"], r["denominator"]) for r in first["ratios"]}
    assert {("fused", "reference"), ("fused", "peer"), ("reference", "peer")} <= pairs
    h = train["headline"]
    for key in ("mfu", "fused_vs_reference", "fused_vs_peer"):
        assert h[key]["value"] > 0 and h[key]["verdict"] in ("met", "not met")
    assert train["comparisons"][1]["preset"].startswith("camae_vit_micro") and \
        train["comparisons"][1]["stacks"] == ["fused", "reference"]
    assert train["attention_choices"] == []  # on a CPU SDPA keeps its own choice: nothing measured
    # the data path beside the step: the packed synthetic screen through the training stream, at the step's batch
    loader = train["loader"]
    assert loader["status"] == "ok" and loader["batch"] == first["batch"] and loader["crop"] == 64
    fused = next(r for r in first["records"] if r["stack"] == "fused")
    assert loader["step_crops_per_s"] == h["fused_crops_per_s"] == fused["crops_per_s"]
    assert loader["loader_crops_per_s"] > 0 and h["loader_vs_step"] == loader["loader_vs_step"]
    assert h["loader_vs_step"]["value"] == pytest.approx(loader["loader_crops_per_s"] / loader["step_crops_per_s"])
    assert h["loader_vs_step"]["target"] == 1.5
    inference = _load(out, "inference.json")
    assert [c["stacks"] for c in inference["comparisons"]] == [["fused", "peer"], ["fused"]]
    assert all(r["status"] == "ok" for c in inference["comparisons"] for r in c["records"])
    compiled = _load(out, "compiled.json")
    recs = compiled["comparisons"][0]["records"]
    assert [r["stack"] for r in recs] == ["fused_compiled", "reference_compiled", "peer_compiled"]
    assert all(r["status"] == "ok" and r["compile_mode"] == "regional" and "graphs" in r["dynamo"] for r in recs)
    # blocks of one type share compiled code: the first compiled stack traces, later ones may reuse its graphs
    assert recs[0]["dynamo"]["graphs"] >= 1
    assert compiled["comparisons"][0]["batch"] == first["batch"]  # reuses the eager stage's batch
    tests = _load(out, "tests.json")
    assert tests["rc"] == 0 and tests["collected"] > 0 and "--collect-only" in tests["command"]
    md = (out / "results.md").read_text()
    assert "not measured on a GPU" in md and "fused / peer" in md and "| masked_patchify |" in md
    assert "- data path (mae_vit_micro_patch8_256:img_size=64, batch 2): " in md and "loader / step " in md
    assert "## Attention: SDPA backends" in md and "| MAE decoder (toy) | 2x2x65x8 |" in md


def test_prepare_records_the_commit_for_a_tree_without_git(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu.sh")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), "--prepare"], check=True, capture_output=True)
    prepared = json.loads((repo / "benchmarks" / ".commit").read_text())
    assert prepared["commit"] == head and prepared["dirty"] is False
    # what bench's provenance reports for that tree once .git is gone (the GPU machine's copy)
    shutil.rmtree(repo / ".git")
    from mae_fast.perf.provenance import git_commit

    env = {k: v for k, v in os.environ.items() if k != "MAE_FAST_GIT_COMMIT"}
    info = git_commit(str(repo), env)
    assert info == {"commit": head, "dirty": False, "source": "benchmarks/.commit", "prepared": prepared["date"]}
    assert git_commit(str(repo), dict(env, MAE_FAST_GIT_COMMIT="abc"))["commit"] == "abc"
    (repo / "benchmarks" / ".commit").unlink()
    assert git_commit(str(repo), env)["commit"] == "unknown"


def test_kernel_predictions_are_matched_by_op_and_size(tmp_path):
    headline = load_benchmark_script("headline")
    sizes = headline.bench_ops.CUDA_SIZES  # batch 256, patch 8, Lion over ViT-L/8
    predictions = [
        {"kernel": "masked_patchify", "size": "B256 p8", "floor_s": 1e-4, "predicted_s": 2e-4},
        {"kernel": "masked_patchify", "size": "B128 p8", "floor_s": 5e-5, "predicted_s": 1e-4},
        {"kernel": "unshuffle.forward", "size": "B256 p8", "floor_s": 1e-4, "predicted_s": 1e-4},
        {"kernel": "unshuffle.backward", "size": "B256 p8", "floor_s": 1e-4, "predicted_s": 3e-4},
        {"kernel": "lion_update", "size": "mae_vit_large_patch8_256", "floor_s": 1e-3, "predicted_s": 1e-3},
    ]
    path = tmp_path / "kernel_predictions.json"
    path.write_text(json.dumps({"kernels": predictions}))
    loaded = headline.load_predictions(str(path))
    p = headline.prediction_for("masked_patchify", sizes, loaded)
    assert p["predicted_ms"] == pytest.approx(0.2) and p["predicted_fraction_of_floor"] == pytest.approx(0.5)
    u = headline.prediction_for("unshuffle", sizes, loaded)  # forward + backward, as bench_ops times it
    assert u["kernels"] == ["unshuffle.forward", "unshuffle.backward"] and u["predicted_ms"] == pytest.approx(0.4)
    assert headline.prediction_for("lion_update", sizes, loaded)["predicted_fraction_of_floor"] == pytest.approx(1)
    assert headline.prediction_for("mae_loss", sizes, loaded) == "no prediction"
    assert headline.load_predictions(str(tmp_path / "missing.json")) == []
