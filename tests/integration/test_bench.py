"""The benchmark harness on a CPU: `mae-fast bench` writes a valid results JSON with provenance, the stacks run the
implementations they claim, the largest-batch search converges, `mae-fast flops` writes its plot, and the README
renderer fills (only) its block. Correctness of the harness, not speed: no timing is asserted."""
from __future__ import annotations

import json
import time

import pytest
import torch

from mae_fast.cli import bench as bench_cli
from mae_fast.cli import flops as flops_cli
from mae_fast.cli.bench import split_specs
from mae_fast.perf import flops
from mae_fast.perf.harness import BenchSettings, batch_for_memory, compare_stacks, find_max_batch
from mae_fast.perf.provenance import validate_payload
from mae_fast.perf.stacks import FUSED_OPS, STACKS, default_stacks, parse_preset, reset_compiled
from tests.helpers import load_benchmark_script

TINY = "mae_vit_micro_patch16_256:img_size=64"  # 16 tokens: seconds per stack on a CPU


def _render_module():
    return load_benchmark_script("render_results")


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    rc = bench_cli.main(["--device", "cpu", "--preset", TINY, "--stacks", ",".join(default_stacks()),
                     "--rounds", "2", "--iters", "1", "--warmup", "0", "--amp", "fp32", "--out", str(out)])
    with open(out) as f:
        return rc, json.load(f)


def test_bench_cli_writes_results_with_provenance(cpu_results):
    rc, payload = cpu_results
    assert rc == 0
    validate_payload(payload)
    prov = payload["provenance"]
    assert prov["device_type"] == "cpu" and prov["torch"] == torch.__version__
    assert prov["git"]["commit"] and "date" in prov and "--preset" in prov["command"]
    assert payload["ceiling"]["tflops"] > 0 and payload["ceiling"]["dtype"] == "float32"
    stacks = {r["stack"]: r for r in payload["train"]}
    assert set(stacks) == set(default_stacks())
    for rec in payload["train"]:
        assert rec["status"] == "ok", rec
        assert rec["img_size"] == 64 and rec["batch"] == 2 and rec["timed_steps"] == 2
        assert rec["crops_per_s"] > 0 and rec["flops_per_crop"] == flops.training_flops_per_crop(
            parse_preset(TINY))
        assert rec["achieved_tflops"] == pytest.approx(rec["flops_per_crop"] * rec["crops_per_s"] / 1e12)
        assert rec["mfu"] == pytest.approx(rec["achieved_tflops"] / payload["ceiling"]["tflops"])
        assert rec["stack"].startswith("peer") or rec["impls"]["attention"] == "sdpa"
        assert rec["max_batch"] is None and rec["max_batch_note"] == "not searched on CPU"
    # the reference stacks run the references and foreach Lion; compiled stacks really compiled
    for name in ("reference_compiled", "fused_compiled", "peer_compiled"):
        if name in stacks:  # regional compilation: every block compiled, the rest eager
            assert stacks[name]["compile_mode"] == "regional" and "graphs" in stacks[name]["dynamo"]
    for name in ("reference", "reference_compiled"):
        assert {stacks[name]["impls"][op] for op in ("masked_patchify", "unshuffle", "masked_mae_loss")} == {"reference"}
        assert stacks[name]["impls"]["lion_update"] == "foreach"
    assert stacks["reference_compiled"]["dynamo"]["graphs"] >= 1
    assert stacks["reference_compiled"]["compile_backend"] == "aot_eager"
    # ratios of the same run, from both rounds
    pairs = {(r["numerator"], r["denominator"]): r for r in payload["ratios"]}
    assert ("fused", "reference") in pairs and pairs[("fused", "reference")]["rounds"] == 2
    peers = ["peer", "peer_compiled"] if "peer" in stacks else []
    if peers:  # the peer: timm's model and Lion, compared in the same rounds
        assert stacks["peer"]["impls"] == {"model": "timm", "optimizer": "timm.optim.Lion"}
        assert {("fused", "peer"), ("fused_compiled", "peer_compiled")} <= set(pairs)
    assert [r["stack"] for r in payload["inference"]] == ["fused", "fused_compiled"] + peers
    assert all(r["status"] == "ok" for r in payload["inference"])


def test_render_results_fills_only_the_readme_block(cpu_results, tmp_path):
    _, payload = cpu_results
    render = _render_module()
    result_file = tmp_path / "r.json"
    result_file.write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nafter\n")
    assert render.main([str(result_file), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("after\n")
    block = text.split("<!-- results:begin -->\n")[1].split("<!-- results:end -->")[0]
    assert "| mae_vit_micro_patch16_256:img_size=64 | reference |" in block
    assert "not measured on a GPU" in block and payload["provenance"]["git"]["commit"][:10] in block
    assert "| mae_vit_micro_patch16_256:img_size=64 | train | fused / reference |" in block  # ratios with their step
    broken = tmp_path / "BROKEN.md"
    broken.write_text("no markers here\n")
    assert render.main([str(result_file), "--readme", str(broken)]) == 2
    assert broken.read_text() == "no markers here\n"


def test_bench_cli_rejects_bad_arguments(capsys):
    assert bench_cli.main(["--device", "cpu", "--preset", "mae_vit_nope_256"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert bench_cli.main(["--device", "cpu", "--stacks", "reference,turbo"]) == 2
    assert "turbo" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad override"):
        parse_preset("mae_vit_micro_patch16_256:img_sise=64")
    cfg = parse_preset("camae_vit_micro_patch16_256:img_size=32,in_chans=3,mask_ratio=0.5")
    assert (cfg.img_size, cfg.in_chans, cfg.mask_ratio) == (32, 3, 0.5)
    assert split_specs(["a:img_size=64,in_chans=3,b", "c"]) == ["a:img_size=64,in_chans=3", "b", "c"]


def test_batch_for_memory_extrapolates_two_probe_steps():
    # 1 GiB fixed + 0.5 GiB per crop, measured at batches 8 and 16
    gib = 2**30
    peaks = {8: gib + 8 * gib // 2, 16: gib + 16 * gib // 2}
    assert batch_for_memory(peaks, 101 * gib) == 200
    assert batch_for_memory(peaks, 100 * gib) == 192  # 198 crops fit: rounded down to a multiple of 8
    assert batch_for_memory(peaks, 10_000 * gib, limit=1024) == 1024
    assert batch_for_memory(peaks, gib) == 8  # never below one multiple
    with pytest.raises(ValueError, match="two different batches"):
        batch_for_memory({8: gib}, gib)


def test_compare_stacks_stops_at_the_deadline_and_keeps_what_it_measured():
    cfg = parse_preset(TINY)
    stacks = [STACKS["reference"]]
    spent = BenchSettings(device=torch.device("cpu"), amp=None, warmup=0, iters=1, rounds=1,
                                deadline=time.monotonic() - 1)
    records, ratios, stopped = compare_stacks("train", TINY, cfg, stacks, 2, spent, None)
    assert stopped == "time budget spent" and ratios == []
    assert records[0]["status"] == "interrupted" and "time budget spent" in records[0]["error"]
    fine = BenchSettings(device=torch.device("cpu"), amp=None, warmup=0, iters=1, rounds=1,
                               deadline=time.monotonic() + 600)
    records, _, stopped = compare_stacks("train", TINY, cfg, stacks, 2, fine, None)
    assert not stopped and records[0]["status"] == "ok"


@pytest.mark.parametrize("preset,blocks", [("mae_vit_micro_patch16_256", 4 + 2),
                                           # CA-MAE: the decoder's 2 channel-stacked layers (6 channels each)
                                           ("camae_vit_micro_patch16_256", 4 + 2)])
def test_regional_compilation_compiles_each_block_and_keeps_the_function(preset, blocks):
    from mae_fast.compiling import compile_blocks, repeated_blocks
    from mae_fast.models import MaskedAutoencoder

    cfg = parse_preset(preset + ":img_size=32,drop_path=0.0")
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg).eval()
    images = torch.randint(0, 256, (2, cfg.in_chans, 32, 32), dtype=torch.uint8)
    eager = model.embed(images)
    reset_compiled()
    assert len(repeated_blocks(model)) == blocks
    assert compile_blocks(model, "aot_eager") == blocks
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(model))
    torch.testing.assert_close(model.embed(images), eager)


class _FakeRunner:
    """Steps fail with out-of-memory above `capacity` crops, and with a launch-limit error at `broken`."""

    def __init__(self, capacity: int, broken: int | None = None):
        self.cfg = parse_preset("mae_vit_micro_patch16_256:img_size=16")
        self.capacity, self.broken = capacity, broken
        self.tried: list[int] = []

    def step(self, images):
        batch = images.shape[0]
        self.tried.append(batch)
        if self.broken is not None and batch >= self.broken:
            raise RuntimeError("CUDA error: invalid configuration argument")
        if batch > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("capacity", [0, 1, 37, 300, 5000])
def test_max_batch_search_converges(capacity):
    runner = _FakeRunner(capacity)
    result = find_max_batch(lambda b: runner, torch.device("cpu"), start=4, limit=4096, time_cap_s=60)
    if capacity >= 4096:
        assert result["max_batch"] == 4096 and result["first_failing_batch"] is None
    elif capacity == 0:
        assert result["max_batch"] is None and result["first_failing_batch"] == 1
    else:  # within ~3% below the true capacity
        assert capacity * 0.96 <= result["max_batch"] <= capacity < result["first_failing_batch"]
    assert not result["capped"] and result["note"] is None


def test_max_batch_search_reports_non_oom_failures():
    runner = _FakeRunner(capacity=10_000, broken=100)
    result = find_max_batch(lambda b: runner, torch.device("cpu"), start=8, limit=4096, time_cap_s=60)
    assert result["max_batch"] < 100 <= result["first_failing_batch"]
    assert "invalid configuration" in result["note"]


def test_flops_command_prints_counts_and_writes_plots(tmp_path, capsys):
    png, js = tmp_path / "scaling.png", tmp_path / "flops.json"
    assert flops_cli.main(["--plot", str(png), "--json", str(js), "--crops-per-s", "567"]) == 0
    text = capsys.readouterr().out
    assert "ViT-L/8" in text and "implied MFU 10.8%" in text and "GPU-hours" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    payload = json.loads(js.read_text())
    assert {m["label"] for m in payload["models"]} >= {"ViT-S/16", "ViT-L/8"}
    # a recorded metric against training FLOPs
    runs = tmp_path / "runs.csv"
    runs.write_text("model,crops,recall,label\nViT-S/16,1e8,0.41,S16\nViT-B/8,4e8,0.52,B8\nViT-L/8,3.5e9,0.62,L8+\n")
    png2 = tmp_path / "recall.png"
    assert flops_cli.main(["--metrics", str(runs), "--plot", str(png2)]) == 0
    assert png2.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.csv"
    bad.write_text("model,crops\nViT-S/16,1e8\n")
    assert flops_cli.main(["--metrics", str(bad), "--no-plot"]) == 2
    assert "--metric" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse refuses it before any count
        flops_cli.main(["--mask-ratio", "1.0", "--no-plot"])
    assert refused.value.code == 2 and "argument --mask-ratio: must be < 1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_harness_on_gpu(tmp_path):
    """The CUDA paths of the harness (bf16 ceiling, CUDA events, peak memory, largest-batch search, Triton
    dispatch) before gpu.sh spends minutes on the large presets."""
    from mae_fast import ops

    out = tmp_path / "gpu.json"
    rc = bench_cli.main(["--device", "cuda", "--preset", "mae_vit_micro_patch16_256", "--stacks", "reference,fused",
                     "--rounds", "2", "--iters", "2", "--warmup", "1", "--no-inference",
                     "--max-batch-presets", "mae_vit_micro_patch16_256", "--max-batch-time", "10", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert rc == 0, payload
    validate_payload(payload)
    assert payload["ceiling"]["dtype"] == "bfloat16" and payload["ceiling"]["tflops"] > 10
    assert payload["provenance"]["device_type"] == "cuda" and payload["provenance"]["compute_capability"]
    stacks = {r["stack"]: r for r in payload["train"]}
    for rec in stacks.values():
        assert rec["status"] == "ok" and rec["amp"] == "bfloat16"
        assert rec["peak_mem_bytes"] > 0 and 0 < rec["mfu"] < 1.5
        assert rec["max_batch"] is None or rec["max_batch"] >= rec["batch"]
    assert stacks["reference"]["impls"]["masked_patchify"] == "reference"
    for op in FUSED_OPS:
        if "triton" in ops.available_impls(op):
            assert stacks["fused"]["impls"][op] == "triton", op


def test_selective_checkpointing_saves_matmuls_recomputes_the_rest(monkeypatch):
    from mae_fast import compiling
    from mae_fast.models import MaskedAutoencoder

    cfg = parse_preset("mae_vit_micro_patch16_256:img_size=32,drop_path=0.0")
    torch.manual_seed(0)
    plain = MaskedAutoencoder(cfg)
    sac = MaskedAutoencoder(cfg)
    sac.load_state_dict(plain.state_dict())
    calls = []
    for i, block in enumerate(compiling.repeated_blocks(sac)):  # count runs of each block's own forward
        block.forward = lambda *a, _f=block.forward, _i=i: (calls.append(_i), _f(*a))[1]
    assert compiling.selective_checkpointing(sac) == 4 + 2
    decisions = []
    policy = compiling._save_matmuls

    def spy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((ctx.is_recompute, op, decision))
        return decision

    monkeypatch.setattr(compiling, "_save_matmuls", spy)
    images = torch.randint(0, 256, (2, cfg.in_chans, 32, 32), dtype=torch.uint8)
    losses = []
    for model in (plain, sac):
        loss = model(images, generator=torch.Generator().manual_seed(1)).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(plain.named_parameters(), sac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    saved = {op for _, op, d in decisions if d == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE}
    assert torch.ops.aten.addmm.default in saved and saved <= compiling.SAVED_OPS
    assert any(op == torch.ops.aten.native_layer_norm.default for _, op, _ in decisions)  # recomputed, not saved
    assert sorted(calls) == sorted(list(range(6)) * 2)  # each block ran twice: forward, and recomputed in backward
    with torch.no_grad():  # inference: no checkpointing at all
        n, calls[:] = len(decisions), []
        sac.embed(images)
        assert len(decisions) == n and sorted(calls) == list(range(4))  # the encoder's blocks, once


def test_each_stack_is_probed_alone_and_a_compiled_stack_as_its_eager_twin():
    """A probe that fails (a first Triton launch, a timm mismatch, an out-of-memory error) is recorded and the other
    stacks are probed; a compiled stack is probed as its eager twin, so the compiled stage always gets a batch."""
    from mae_fast.perf.harness import probe_each_stack

    seen = []

    def probe(cfg, stack, settings, batch):
        seen.append(stack.name)
        if stack.name == "peer":
            raise RuntimeError("timm mismatch\nsecond line")
        return {batch: 100, 2 * batch: 180}, 1000

    settings = BenchSettings(device=torch.device("cpu"), amp=None)
    stacks = [STACKS[n] for n in ("fused", "peer", "reference_compiled", "reference")]
    per_stack, resident, errors = probe_each_stack(parse_preset(TINY), stacks, settings, 8, probe_fn=probe)
    assert seen == ["fused", "peer", "reference"]  # reference_compiled probed as reference, once
    assert set(per_stack) == {"fused", "reference"} and resident == 2000
    assert errors == {"peer": "RuntimeError: timm mismatch"}
    compiled_only = [STACKS[n] for n in ("fused_compiled", "peer_compiled")]
    per_stack, _, errors = probe_each_stack(parse_preset(TINY), compiled_only, settings, 8, probe_fn=probe)
    assert set(per_stack) == {"fused"} and set(errors) == {"peer"}


def test_the_memory_window_holds_no_first_step_of_a_shape(monkeypatch):
    """Each probe batch's first step (kernels compiled, the SDPA backends timed with the math backend's full score
    matrix) runs before any peak-memory window opens; each window holds one step of an already seen shape."""
    from mae_fast.perf import harness

    events = []
    window = {"open": False}

    class FakeRunner:
        cfg = parse_preset(TINY)

        def step(self, images):
            events.append((images.shape[0], window["open"]))

    def reset_peak(device):
        window["open"] = True

    def max_allocated(device):
        window["open"] = False
        return 1000 * events[-1][0]

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_allocated)
    peaks = harness.probe_step_peaks(FakeRunner(), (8, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert peaks == {8: 8000, 16: 16000}
    first_in_window = {}
    for batch, in_window in events:
        first_in_window.setdefault(batch, in_window)
    assert first_in_window == {8: False, 16: False}
    assert [e for e in events if e[1]] == [(8, True), (16, True)]


def test_compare_stacks_reports_progress_and_a_faulted_stack_fails_alone(monkeypatch):
    from mae_fast.perf import faults

    cfg = parse_preset(TINY)
    settings = BenchSettings(device=torch.device("cpu"), amp=None, warmup=0, iters=1, rounds=2,
                             deadline=time.monotonic() + 600)
    calls = []
    monkeypatch.setenv(faults.ENV, "bench:reference")
    faults.set_stage("bench")
    try:
        records, ratios, stopped = compare_stacks(
            "train", TINY, cfg, [STACKS["fused"], STACKS["reference"]], 2, settings, 1.0,
            progress=lambda recs, rats: calls.append(([dict(r) for r in recs], rats)))
    finally:
        faults.set_stage(None)
    assert not stopped and ratios == []
    recs = {r["stack"]: r for r in records}
    assert recs["fused"]["status"] == "ok" and recs["fused"]["timed_steps"] == 2
    assert recs["reference"]["status"] == "error" and "InjectedFault" in recs["reference"]["error"]
    # after each warmed (or failed) stack, then after each round: the caller can write a headline every time
    assert len(calls) == 2 + 2
    assert "crops_per_s" not in calls[1][0][0] and calls[2][0][0]["timed_steps"] == 1
    assert recs["fused"]["mfu_datasheet"] is None  # a CPU has no datasheet peak in the table


def test_compare_stacks_skips_a_stack_whose_build_does_not_fit():
    cfg = parse_preset(TINY)
    settings = BenchSettings(device=torch.device("cpu"), amp=None, warmup=0, iters=1, rounds=1,
                             deadline=time.monotonic() + 300)
    records, _, _ = compare_stacks("train", TINY, cfg, [STACKS["reference"]], 2, settings, None,
                                   build_seconds={"reference": 10_000.0})
    assert records[0]["status"] == "skipped" and "cold compile estimate" in records[0]["error"]


def test_mfu_against_the_datasheet_and_a_ceiling_in_the_runs_dtype():
    from mae_fast.perf.timing import datasheet_peak_tflops, measure_matmul_ceiling, summarise

    assert datasheet_peak_tflops("NVIDIA H200") == 989.0
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # the SXM part's name
    assert datasheet_peak_tflops("NVIDIA H100 PCIe") is None and datasheet_peak_tflops("cpu") is None
    s = summarise([0.5], 100, 10**12, ceiling_tflops=400.0, datasheet_tflops=800.0)
    assert s["achieved_tflops"] == pytest.approx(200.0)
    assert s["mfu"] == pytest.approx(0.5) and s["mfu_datasheet"] == pytest.approx(0.25)
    bf16 = measure_matmul_ceiling(torch.device("cpu"), size=64, repeats=2, dtype=torch.bfloat16)
    assert bf16["dtype"] == "bfloat16" and bf16["tflops"] > 0
    assert measure_matmul_ceiling(torch.device("cpu"), size=64, repeats=2)["dtype"] == "float32"


def test_render_results_names_a_silent_fallback_and_both_mfus():
    render = _render_module()
    assert render._ops({"masked_patchify": "triton", "unshuffle": "reference", "attention": "sdpa"}, "fused") == \
        "reference/triton (FALLBACK: unshuffle)"
    assert render._ops({"masked_patchify": "reference", "lion_update": "foreach"}, "reference") == "foreach/reference"
    payload = {"provenance": {"device": "NVIDIA H200", "device_type": "cuda", "date": "d", "torch": "t",
                              "command": "c", "git": {"commit": "abc"}},
               "ceiling": {"tflops": 800.0, "dtype": "bfloat16"},
               "train": [{"kind": "train", "preset": "p", "stack": "fused", "batch": 8, "status": "ok",
                          "crops_per_s": 10.0, "achieved_tflops": 400.0, "mfu": 0.5, "mfu_datasheet": 0.404,
                          "impls": {"unshuffle": "reference", "attention": "flash"}},
                         {"kind": "train", "preset": "p", "stack": "peer", "status": "error", "error": "x"}]}
    text = render.render_payload(payload)
    assert "| 50.0% | 40.4% |" in text and "(FALLBACK: unshuffle)" in text and "no loading" in text
    assert "| p | peer | - | error: x |" in text  # a record that failed before its batch was known
