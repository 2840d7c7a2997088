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
import time

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
    # every number says what it is: the implementations that ran, no loading in crops/s, both MFUs, the loader bound
    assert "| fused | ok | " in md and "patchify cpp" in md and "FALLBACK" not in md
    assert "no loading" in md and "datasheet" in md and "an upper bound: uncompressed" in md
    assert loader["bound"].startswith("upper bound") and h["mfu_datasheet"] is None  # a CPU: no datasheet peak
    # the tests stage ran (here: collected) the headline kernels' tests first, progress kept per test
    assert tests["progress"]["collected"] == tests["collected"]
    assert any(w in tests["progress"]["run_order_head"][0] for w in ("masked_patchify", "unshuffle"))


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


# --------------------------------------------------------------------------------------------------------------
# failure injection (MAE_FAST_GPU_FAULT): each run still writes results.md with everything the fault did not touch
# --------------------------------------------------------------------------------------------------------------

def _faulted_run(tmp_path_factory, stages: str, faults: str):
    pytest.importorskip("timm", reason="the faulted runs fail the timm peer on purpose")
    out = tmp_path_factory.mktemp("gpu_fault")
    env = dict(os.environ, MAE_FAST_GPU_DRYRUN="1", PYTHON=sys.executable, STAGES=stages, MAE_FAST_GPU_FAULT=faults,
               STAGE_SCALE="6", BUDGET_S="3600")
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=3700)
    return proc, out


@pytest.fixture(scope="module")
def faulted_a(tmp_path_factory):
    """A failing op, a failing stack, and the deadline passing after the first timed round."""
    return _faulted_run(tmp_path_factory, "kernels train", "kernels:lion,train:peer,deadline:train:round2")


@pytest.fixture(scope="module")
def faulted_b(tmp_path_factory):
    """A failing preset, a failing loader, then a SIGTERM inside the inference stage before its second preset's
    batch is known."""
    return _faulted_run(tmp_path_factory, "train infer compiled tests",
                        "train:mae_vit_micro_patch8,train:loader,sigterm:infer:camae")


def test_a_failing_op_and_stack_fail_alone_and_the_headline_survives_the_deadline(faulted_a):
    proc, out = faulted_a
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = _load(out, "kernels.json")
    assert kernels["status"] == "ok"
    ops = {e["op"]: e for e in kernels["ops"]}
    assert "InjectedFault" in ops["lion_update"]["error"] and not ops["lion_update"].get("cases")
    for op in ("masked_patchify", "unshuffle", "mae_loss"):  # the ops the fault did not touch have numbers
        assert "error" not in ops[op] and all(c["median_ms"] > 0 for c in ops[op]["cases"])
    assert all(e["seconds"]["math"] > 0 for e in kernels["attention"]["shapes"])  # measured after the failed op
    train = _load(out, "train.json")
    assert train["status"] == "time budget spent"
    first = train["comparisons"][0]
    assert first["status"] == "time budget spent" and first["batch"] == 2
    recs = {r["stack"]: r for r in first["records"]}
    assert recs["peer"]["status"] == "error" and "InjectedFault" in recs["peer"]["error"]
    assert recs["fused"]["status"] == recs["reference"]["status"] == "ok"  # one round measured, kept
    assert recs["fused"]["crops_per_s"] > 0 and recs["fused"]["timed_steps"] == 1
    # the headline was written while the comparison ran: the deadline in round 2 does not lose it
    h = train["headline"]
    assert h["fused_crops_per_s"] == recs["fused"]["crops_per_s"] and h["fused_vs_reference"]["value"] > 0
    assert h["fused_vs_peer"]["value"] is None and len(train["comparisons"]) == 1
    md = (out / "results.md").read_text()
    assert "| peer | error: InjectedFault: injected fault at train:peer" in md
    assert "| lion_update | None | error: InjectedFault" in md and "| unshuffle | True | fused |" in md
    assert "| fused | ok | " in md and "fused / reference: " in md
    assert "| env.json | missing |" in md  # a stage not asked for


def test_a_failing_preset_and_loader_and_a_sigterm_keep_the_rest(faulted_b):
    proc, out = faulted_b
    assert proc.returncode == 143, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = _load(out, "train.json")
    assert train["status"] == "ok"
    vit, camae = train["comparisons"]
    assert vit["status"] == "error" and "InjectedFault" in vit["error"] and "batch" not in vit
    assert train["loader"]["status"] == "error" and "InjectedFault" in train["loader"]["error"]
    assert camae["status"] == "ok" and all(r["status"] == "ok" and r["crops_per_s"] > 0 for r in camae["records"])
    infer = _load(out, "inference.json")
    assert infer["status"] == "interrupted (SIGTERM)"
    done, cut = infer["comparisons"]
    assert done["status"] == "ok" and infer["headline"][done["preset"]]["fused_crops_per_s"] > 0
    assert cut["status"] == "interrupted" and "batch" not in cut
    for name in ("compiled.json", "tests.json"):
        assert _load(out, name)["status"] == "not run (SIGTERM received)"
    md = (out / "results.md").read_text()
    assert "### train mae_vit_micro_patch8_256:img_size=64 (batch not known) (train.json): error — InjectedFault" in md
    assert "- data path: error: InjectedFault" in md
    assert "### inference camae_vit_micro_patch16_256:img_size=64 (batch not known) (inference.json): interrupted" in md
    assert "| compiled.json | not run (SIGTERM received) |" in md and "not rendered" not in md


# --------------------------------------------------------------------------------------------------------------
# in-process: the report, the faults' grammar, the tests stage, the compiled stage's budget (no dry run needed)
# --------------------------------------------------------------------------------------------------------------

def _write_stage_files(folder, files: dict) -> None:
    for name, payload in files.items():
        (folder / name).write_text(payload if isinstance(payload, str) else json.dumps(payload))


def test_render_survives_every_partial_state(tmp_path):
    """The crashes seen at 1adef0f (KeyError 'batch' on a comparison stopped before its batch was known, KeyError
    'seconds' on an attention entry that failed) and worse: files cut short, wrong types, missing keys."""
    headline = load_benchmark_script("headline")
    prov = {"device": "cpu", "torch": "x", "triton": None, "git": {"commit": "abc"}, "date": "d"}
    rec_ok = {"stack": "fused", "status": "ok", "crops_per_s": 10.0, "mfu": 0.5, "mfu_datasheet": 0.25,
              "impls": {"masked_patchify": "triton", "unshuffle": "reference", "masked_mae_loss": "triton",
                        "lion_update": "triton", "attention": "flash"}}
    states = [
        {"train.json": {"provenance": prov, "status": "interrupted",
                        "comparisons": [{"kind": "train", "preset": "camae", "status": "interrupted"}]},
         "kernels.json": {"provenance": prov, "status": "error",
                          "attention": {"dtype": "bf16", "batch": 2, "packages": {},
                                        "shapes": [{"shape": "enc", "q": [2, 2, 17, 16], "error": "OOM"}]}}},
        {"train.json": {"provenance": prov, "comparisons": [{"kind": "train", "preset": "p", "batch": 8,
                                                              "records": [rec_ok, {"stack": "peer"}],
                                                              "ratios": [{"numerator": "fused"}]}],
                        "headline": {"preset": "p"}, "loader": {"status": "running"}},
         "kernels.json": {"ops": [{"op": "lion_update", "error": "boom"}, {"op": "unshuffle", "cases": [{}]}]},
         "tests.json": {"progress": {"collected": 3, "files": {"tests/a.py": {"passed": 1}}}},
         "env.json": '{"schema": "mae_fast.headline/1", "stage": "env", "stat'},  # cut mid-write
        {"train.json": [], "inference.json": {"headline": {"p": {}}, "comparisons": [{}]}, "compiled.json": "null",
         "env.json": {"matmul_ceiling": {"tflops": None}}},
    ]
    for i, files in enumerate(states):
        folder = tmp_path / str(i)
        folder.mkdir()
        _write_stage_files(folder, files)
        text = headline.render(str(folder))
        assert text.startswith("# mae_fast GPU headline")
    text = headline.render(str(tmp_path / "0"))
    assert "### train camae (batch not known) (train.json): interrupted" in text
    assert "| enc | 2x2x17x16 |" in text and "error: OOM" in text
    text = headline.render(str(tmp_path / "1"))
    # which implementation ran, per row; the fused stack's reference unshuffle is a visible fallback
    assert "unshuffle reference (FALLBACK)" in text and "patchify triton" in text and "attention flash" in text
    assert "| fused | ok | 10 | 50.0% | 25.0% |" in text and "| peer | ? |" in text
    assert "| lion_update | None | error: boom |" in text and "tests/a.py: 1 passed" in text


def test_fault_grammar():
    from mae_fast.perf import faults

    parsed = faults.parse("train:peer, kernels:lion,deadline:train:round2,sigterm:infer")
    assert parsed == [faults.Fault("raise", "train", "peer"), faults.Fault("raise", "kernels", "lion"),
                      faults.Fault("deadline", "train", "round2"), faults.Fault("sigterm", "infer", None)]
    assert parsed[1].matches("kernels", "lion_update", 1) and not parsed[1].matches("train", "lion_update", 1)
    assert parsed[3].matches("infer", "anything", 2) and not parsed[3].matches("infer", "anything", 1)
    for bad in ("train", "deadline", "deadline:", "train:"):
        with pytest.raises(ValueError, match="MAE_FAST_GPU_FAULT"):
            faults.parse(bad)


def test_injected_faults_act_only_at_their_point(monkeypatch):
    from mae_fast.perf import faults
    from mae_fast.perf.timing import BudgetSpent

    monkeypatch.setenv(faults.ENV, "train:peer,deadline:train:round2")
    faults.set_stage("kernels")
    faults.point("peer")  # another stage: nothing
    faults.set_stage("train")
    try:
        faults.point("fused")
        with pytest.raises(faults.InjectedFault, match="train:peer"):
            faults.point("peer")
        faults.point("round1")
        with pytest.raises(BudgetSpent):
            faults.point("round2")
    finally:
        faults.set_stage(None)


def test_tests_stage_runs_the_headline_kernels_first_and_keeps_what_finished(tmp_path):
    """pytest cut by the deadline: the tests that finished are in tests.json, per file, the headline's first."""
    headline = load_benchmark_script("headline")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_a_slow.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(120)\n")
    (suite / "test_b_kernels.py").write_text("def test_lion_step():\n    pass\n\ndef test_unshuffle_fails():\n"
                                             "    assert False\n")
    out = tmp_path / "tests.json"
    writer = headline.Writer(str(out), {"stage": "tests"})
    t0 = time.monotonic()
    headline.stage_tests(writer, None, time.monotonic() + 20, selection=[str(suite)], cwd=str(suite))
    assert time.monotonic() - t0 < 90  # stopped at the deadline, not after the 120 s test
    p = writer.payload
    assert p["stopped"].startswith("time limit") and p["rc"] in ("interrupted at the time limit",
                                                                 "killed at the time limit")
    prog = p["progress"]
    assert prog["collected"] == 3 and prog["finished"] == 2
    assert [n.split("::")[1] for n in prog["run_order_head"]] == ["test_unshuffle_fails", "test_lion_step",
                                                                  "test_sleeps"]
    assert prog["files"] == {"test_b_kernels.py": {"passed": 1, "failed": 1}}
    assert prog["failed"] == ["test_b_kernels.py::test_unshuffle_fails"]


def test_compiled_stage_is_skipped_with_its_reason_when_the_cold_compile_does_not_fit(tmp_path):
    headline = load_benchmark_script("headline")
    label = "mae_vit_large_patch8_256"
    need = headline.COLD_COMPILE_S[label]["fused_compiled"]
    assert headline.compiled_budget_reason(label, need + 1) is None
    assert headline.compiled_budget_reason(label, None) is None
    assert "cold compile" in headline.compiled_budget_reason(label, need - 1)
    writer = headline.Writer(str(tmp_path / "compiled.json"), {"stage": "compiled"})
    with pytest.raises(headline.StageSkipped, match="skipped: the fused stack's cold compile"):
        headline.stage_compiled(writer, None, time.monotonic() + 1)  # nothing built: no device needed
    assert writer.payload["skipped"].startswith("skipped") and "comparisons" not in writer.payload


def test_the_compiled_stage_reads_the_eager_batch_only_where_there_is_one(tmp_path):
    headline = load_benchmark_script("headline")
    path = tmp_path / "train.json"
    assert headline.eager_batch(str(path)) is None  # missing
    for payload in ({"comparisons": []}, {"comparisons": [{"preset": "p", "status": "error"}]},
                    {"comparisons": [{"batch": None}]}, []):
        path.write_text(json.dumps(payload))
        assert headline.eager_batch(str(path)) is None
    path.write_text(json.dumps({"comparisons": [{"batch": 48}, {"batch": 8}]}))
    assert headline.eager_batch(str(path)) == 48


def test_the_loss_case_is_predicted_by_the_full_prediction_kernel(tmp_path):
    """bench_ops times ops.masked_mae_loss on the full prediction (what the step runs): its prediction is
    "mae_loss.full_prediction", not the gathered "mae_loss" entry with a torch gather and scatter around it."""
    headline = load_benchmark_script("headline")
    sizes = headline.bench_ops.CUDA_SIZES
    loaded = [{"kernel": "mae_loss", "size": "B256 p8", "floor_s": 1e-4, "predicted_s": 9e-4},
              {"kernel": "mae_loss.full_prediction", "size": "B256 p8", "floor_s": 1e-4, "predicted_s": 2e-4}]
    p = headline.prediction_for("mae_loss", sizes, loaded)
    assert p["kernels"] == ["mae_loss.full_prediction"] and p["predicted_ms"] == pytest.approx(0.2)
