"""Options, fixtures and the results writer shared by the pytest-benchmark suites in this folder.

    make bench                  # every suite; pytest-benchmark's JSON (with this machine's provenance) saved
    make bench-compare          # every suite again, compared with the latest saved run; fails on a slowdown
    pytest benchmarks/ --benchmark-disable --bench-toy                               # each suite once, toy sizes (CI)
    pytest benchmarks/bench_train_step.py benchmarks/bench_inference.py              # CPU: micro presets, batch 2
    pytest benchmarks/bench_train_step.py --bench-presets mae_vit_large_patch8_256 --bench-out results/
    pytest benchmarks/bench_*.py --benchmark-json raw.json                           # pytest-benchmark's own file

Every option of the suites is a pytest option defined here (`pytest benchmarks/ --help`, group "mae_fast
benchmarks"); none is read from the environment. pytest-benchmark's saved JSON carries, under
`machine_info.mae_fast`, the device (CPU / GPU model), driver, CUDA, torch, Triton, mae_fast and the commit
(`pytest_benchmark_update_machine_info`), so a comparison says what it compares.

The train-step and embedding suites reuse `mae_fast.perf` (same runners, same stacks, same FLOP counts). Every test
appends one record to the session; at the end the records, the fused/reference ratios of this run and the
provenance are written in the `mae_fast.bench/1` schema (the same as `mae-fast bench`) to --bench-out, and
summarised in the terminal.
"""
from __future__ import annotations

import shlex
import sys

import pytest
import torch

from mae_fast.cli.bench import CPU_PRESETS, GPU_TARGET_PRESETS, preset_set, split_specs
from mae_fast.device import default_amp, resolve_device
from mae_fast.models import list_presets
from mae_fast.perf.harness import (
    BenchSettings,
    RATIO_PAIRS,
    default_batch,
    paper_comparison,
    refresh_cpu_ceiling,
    warm_up,
)
from mae_fast.perf.provenance import SCHEMA, provenance, results_path, write_json
from mae_fast.perf.stacks import default_stacks, parse_stacks
from mae_fast.perf.timing import measure_matmul_ceiling, summarise, time_call
from mae_fast.ops.triton import kernels_module

_RECORDS: list[dict] = []
_STATE: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("mae_fast benchmarks")
    group.addoption("--bench-device", default="auto", help="auto (CUDA if present), cpu, cuda")
    group.addoption("--bench-presets", default=None,
                    help="comma list of presets (overrides as name:img_size=128); default: CPU micro presets, "
                         "GPU every preset")
    group.addoption("--bench-stacks", default=",".join(default_stacks()), help="comma list of stacks")
    group.addoption("--bench-compile-presets", default=None,
                    help="presets that also run compiled stacks: comma list, 'all' or 'none' (default: CPU all, "
                         "GPU " + ",".join(GPU_TARGET_PRESETS) + ")")
    group.addoption("--bench-compile-backend", default=None, help="default: inductor on GPU, aot_eager on CPU")
    group.addoption("--bench-batch", type=int, default=None, help="batch for every preset (default: per device)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per test (default GPU 10, CPU 3; bench_ops GPU 20, CPU 5; "
                         "--bench-toy 1); more rounds make `make bench-compare` steadier")
    group.addoption("--bench-max-batch-time", type=float, default=45.0, help="seconds per largest-batch search")
    group.addoption("--bench-out", default=None, help="results JSON file or folder (mae_fast.bench/1 schema)")
    group.addoption("--bench-baselines", default=None,
                    help="comma list of baseline specs for bench_baselines.py (name:key=value, e.g. "
                         "munet_m_256,wsl_densenet161_256:img_size=128; default: every baseline)")
    group.addoption("--bench-toy", action="store_true",
                    help="toy sizes everywhere (micro models at 64 px, batch 2, one round, small data): proves each "
                         "suite runs, as the test suite does with --benchmark-disable; its times mean nothing")


TOY_PRESETS = ["mae_vit_micro_patch16_256:img_size=64", "camae_vit_micro_patch16_256:img_size=64"]


def pytest_benchmark_update_machine_info(config, machine_info):
    """What pytest-benchmark saves about the machine, plus the device, driver, torch, Triton and the commit."""
    device = bench_device(config)
    prov = provenance(device, "pytest " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    keys = ("device", "device_type", "compute_capability", "driver", "cuda_runtime", "torch", "triton", "mae_fast",
            "cpp_extension", "git", "cpu", "cpu_count")
    machine_info["mae_fast"] = {k: prov[k] for k in keys}
    machine_info["mae_fast"]["toy"] = bool(config.getoption("--bench-toy", default=False))


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: end-to-end benchmark of mae_fast (benchmarks/)")


def _opt(config, name):
    return config.getoption(name, default=None)


def bench_device(config) -> torch.device:
    if "device" not in _STATE:
        _STATE["device"] = resolve_device(_opt(config, "--bench-device") or "auto")
    return _STATE["device"]


def is_toy(config) -> bool:
    return bool(_opt(config, "--bench-toy"))


def selected_presets(config) -> list[str]:
    text = _opt(config, "--bench-presets")
    if text:
        return split_specs([text])
    if is_toy(config):
        return list(TOY_PRESETS)
    if bench_device(config).type == "cpu":
        return list(CPU_PRESETS)
    return list_presets()


def compile_presets(config) -> set[str]:
    presets = selected_presets(config)
    default = [] if is_toy(config) else presets if bench_device(config).type == "cpu" else GPU_TARGET_PRESETS
    return preset_set(_opt(config, "--bench-compile-presets"), presets, default)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "preset" in metafunc.fixturenames:
        metafunc.parametrize("preset", selected_presets(config))
    stacks = [s for s in parse_stacks(_opt(config, "--bench-stacks") or ",".join(default_stacks()))]
    if "stack_name" in metafunc.fixturenames:
        metafunc.parametrize("stack_name", [s.name for s in stacks])
    if "max_batch_case" in metafunc.fixturenames:
        # the largest-batch search: eager stacks of the target presets only (a compiled step recompiles per batch)
        targets = [p for p in selected_presets(config) if p in GPU_TARGET_PRESETS]
        eager = [s.name for s in stacks if not s.compiled]
        cases = [(p, s) for p in targets for s in eager] or [None]
        metafunc.parametrize("max_batch_case", cases, ids=lambda c: "-".join(c) if c else "none-selected")


@pytest.fixture(scope="session")
def bench_toy(pytestconfig) -> bool:
    """--bench-toy: the suites shrink their inputs (each suite says how) so that one pass takes seconds."""
    return is_toy(pytestconfig)


@pytest.fixture(scope="session")
def bench_torch_device(pytestconfig) -> torch.device:
    """The device of --bench-device."""
    return bench_device(pytestconfig)


def bench_rounds(config, device: torch.device) -> int:
    """Timed rounds per test: --bench-rounds, else 1 at toy sizes, 10 on a GPU, 3 on a CPU."""
    return _opt(config, "--bench-rounds") or (1 if is_toy(config) else 10 if device.type == "cuda" else 3)


@pytest.fixture(scope="session")
def settings(pytestconfig) -> BenchSettings:
    device = bench_device(pytestconfig)
    kernels_module()
    backend = _opt(pytestconfig, "--bench-compile-backend") or ("inductor" if device.type == "cuda" else "aot_eager")
    warmup = 0 if is_toy(pytestconfig) else 2 if device.type == "cuda" else 1
    return BenchSettings(device=device, amp=default_amp(device), warmup=warmup,
                         iters=bench_rounds(pytestconfig, device), rounds=1, compile_backend=backend,
                         max_batch_time_s=_opt(pytestconfig, "--bench-max-batch-time"))


def _ceiling(config, device: torch.device, dtype: torch.dtype | None) -> dict:
    """The matmul ceiling in the runs' dtype (MFU like for like)."""
    return measure_matmul_ceiling(device, size=256 if is_toy(config) else None, dtype=dtype or torch.float32)


@pytest.fixture(scope="session")
def ceiling(pytestconfig, settings) -> dict:
    """The device's matmul ceiling, measured once per session (MFU is relative to it)."""
    _STATE["ceiling"] = _ceiling(pytestconfig, settings.device, settings.amp)
    return _STATE["ceiling"]


@pytest.fixture
def batch_for(pytestconfig, settings):
    def pick(cfg, kind: str) -> int:
        toy = 2 if is_toy(pytestconfig) else None
        return _opt(pytestconfig, "--bench-batch") or toy or default_batch(cfg, settings.device, kind)
    return pick


@pytest.fixture
def record():
    """Append a record (e.g. a failure or a skip reason) to this session's results."""
    return _RECORDS.append


@pytest.fixture
def compiled_allowed(pytestconfig):
    return lambda preset: preset in compile_presets(pytestconfig)


@pytest.fixture
def measure(benchmark, settings, ceiling):
    """measure(runner, rec): warm `runner`, time `settings.iters` steps through pytest-benchmark (one step per
    round, CUDA events on a GPU), fill `rec` (crops/s, TFLOP/s, MFU, peak memory, implementations) and keep it
    for the session's results."""

    def run(runner, rec: dict) -> dict:
        warm_up(runner, rec, settings)
        times: list[float] = []
        benchmark.pedantic(lambda: times.append(time_call(runner.step, settings.device)),
                           rounds=settings.iters, iterations=1, warmup_rounds=0)
        rec.update(summarise(times, runner.batch, runner.flops_per_crop(), ceiling["tflops"]), status="ok")
        benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool, dict))})
        _RECORDS.append(rec)
        return rec

    return run


def _ratios(records: list[dict]) -> list[dict]:
    """fused/reference speed ratios from the medians of this session (same run, not interleaved)."""
    out = []
    by_key: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_key.setdefault((r["kind"], r["preset"]), {})[r["stack"]] = r["step_s_median"]
    for (kind, preset), medians in by_key.items():
        for num, den in RATIO_PAIRS:
            if num in medians and den in medians:
                ratio = medians[den] / medians[num]
                out.append({"kind": kind, "preset": preset, "numerator": num, "denominator": den,
                            "ratio_median": ratio, "ratio_min": ratio, "ratio_max": ratio, "rounds": 1})
    return out


def _merge_max_batch(records: list[dict]) -> None:
    """Fold test_max_batch's results into the train records of the same preset and stack."""
    train = {(r["preset"], r["stack"]): r for r in records if r["kind"] == "train"}
    for r in [r for r in records if r["kind"] == "max_batch"]:
        target = train.get((r["preset"], r["stack"]))
        if target is not None:
            target["max_batch"] = r["max_batch"]
            target["max_batch_search"] = r["max_batch_search"]
            records.remove(r)
    for r in train.values():
        r.setdefault("max_batch", None)


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    device = bench_device(session.config)
    _merge_max_batch(_RECORDS)
    ratios = _ratios(_RECORDS)
    payload = {
        "schema": SCHEMA,
        "provenance": provenance(device, "pytest " + " ".join(shlex.quote(a) for a in sys.argv[1:])),
        "ceiling": _STATE.get("ceiling") or _ceiling(session.config, device, default_amp(device)),
        "train": [r for r in _RECORDS if r["kind"] in ("train", "max_batch")],
        "inference": [r for r in _RECORDS if r["kind"] == "inference"],
        "ratios": ratios,
        "skipped": [],
        "source": "pytest-benchmark suites",
    }
    payload["paper_comparison"] = paper_comparison(payload["train"], ratios)
    refresh_cpu_ceiling(payload, device)
    _STATE["payload"] = payload
    out = _opt(session.config, "--bench-out")
    if out:
        path = results_path(out, device)
        write_json(path, payload)
        _STATE["path"] = path


def pytest_terminal_summary(terminalreporter):
    payload = _STATE.get("payload")
    if not payload:
        return
    tr = terminalreporter
    toy = is_toy(tr.config)
    tr.section("mae_fast end-to-end benchmarks" + (" (--bench-toy: toy sizes, no speed claim)" if toy else ""))
    for r in payload["train"] + payload["inference"]:
        if r.get("status") != "ok":
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        tr.write_line(f"{r['kind']:<9} {r['preset']:<42} {r['stack']:<19} batch {r['batch']:>4}  "
                      f"{r['crops_per_s']:9.2f} crops/s  {r['achieved_tflops']:8.3f} TFLOP/s  MFU {mfu:>6}  "
                      f"attention {r.get('impls', {}).get('attention')}")
    for r in payload["ratios"]:
        if r["denominator"] in ("reference", "reference_compiled") and r["numerator"].startswith("fused"):
            tr.write_line(f"ratio {r['kind']:<9} {r['preset']:<42} {r['numerator']}/{r['denominator']}: "
                          f"{r['ratio_median']:.3f}")
    if "path" in _STATE:
        tr.write_line(f"results: {_STATE['path']}")
    if payload.get("paper_comparison"):
        pc = payload["paper_comparison"]
        tr.write_line(f"ViT-L/8: {pc['measured_crops_per_s']:.1f} crops/s -> {pc['gpu_hours_for_paper_crops']:,.0f} "
                      f"device-hours for 3.5e9 crops (paper: > 20,000 A100-hours)")
