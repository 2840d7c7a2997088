"""End-to-end benchmarks: `mae-fast bench`, and the building blocks the pytest-benchmark suites in benchmarks/ use.

A *stack* is one way of running the same MAE train step (forward, backward, Lion step):

    reference           the ops' plain-PyTorch references (MAE_FAST_IMPL=reference), SDPA attention, foreach Lion, eager
    reference_compiled  the same under torch.compile
    fused               mae_fast's default dispatch (impl="auto": Triton on CUDA, C++ on CPU where built), eager
    fused_compiled      the same under torch.compile
    peer                what a user would write from public code instead (`mae_fast.peer`: timm ViT, FAIR-MAE
                        masking after the patch projection, torch.fft loss, timm's Lion), eager; needs timm
    peer_compiled       the same under torch.compile

The peer starts from the same weights as mae_fast's stacks (copied over) and sees the same crops; its FLOPs are
counted as mae_fast's (the useful work), so its extra work (projecting the 75% of tokens it drops) shows as lower
throughput, not as higher FLOP/s.

All stacks of one preset are built from the same seed and timed in interleaved rounds (A B C D A B C D ...), so their
ratios are measured side by side under the same conditions. Throughput is turned into achieved FLOP/s with the exact
count of `mae_fast.flops` and into MFU against the device's matmul ceiling measured in the same run (CUDA: a large
bf16 matmul timed with CUDA events; CPU: an fp32 matmul). Results are JSON with provenance (device, driver, library
versions, git commit, date, command); `benchmarks/render_results.py` turns them into the README table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

import mae_fast
from mae_fast import attention as attention_mod
from mae_fast import flops as flops_mod
from mae_fast import ops
from mae_fast import peer as peer_mod
from mae_fast.compiling import compile_blocks
from mae_fast.models import MAEConfig, MaskedAutoencoder, get_config, list_presets
from mae_fast.optim import Lion, lion_param_groups

SCHEMA = "mae_fast.bench/1"
FUSED_OPS = ("masked_patchify", "unshuffle", "mae_loss", "lion_update")

# --------------------------------------------------------------------------------------------------------------
# Stacks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    name: str
    ops_impl: str         # value of MAE_FAST_IMPL while the stack runs: "reference" or "auto"
    optimizer_impl: str   # Lion(impl=...)
    compiled: bool
    allow_flash_attn: bool  # attention: use_backend("auto") (FlashAttention / fastest SDPA backend), else "sdpa"
    peer: bool = False    # mae_fast.peer's model and timm's Lion instead of MaskedAutoencoder and mae_fast's Lion


STACKS: dict[str, Stack] = {
    "reference": Stack("reference", "reference", "foreach", False, False),
    "reference_compiled": Stack("reference_compiled", "reference", "foreach", True, False),
    "fused": Stack("fused", "auto", "auto", False, True),
    "fused_compiled": Stack("fused_compiled", "auto", "auto", True, True),
    "peer": Stack("peer", "reference", "timm", False, False, peer=True),
    "peer_compiled": Stack("peer_compiled", "reference", "timm", True, False, peer=True),
}


def default_stacks() -> list[str]:
    """Every stack; the peer's only where timm is installed."""
    return [name for name, stack in STACKS.items() if not stack.peer or peer_mod.timm_available()]


@contextlib.contextmanager
def stack_context(stack: Stack):
    """Select the stack's op implementations (MAE_FAST_IMPL) and attention: mae_fast's choice (FlashAttention when
    installed, else the SDPA backend measured fastest per shape) or, for the reference, plain SDPA."""
    old_env = os.environ.get("MAE_FAST_IMPL")
    os.environ["MAE_FAST_IMPL"] = stack.ops_impl
    try:
        with attention_mod.use_backend("auto" if stack.allow_flash_attn else "sdpa"):
            yield
    finally:
        if old_env is None:
            os.environ.pop("MAE_FAST_IMPL", None)
        else:
            os.environ["MAE_FAST_IMPL"] = old_env


def parse_preset(spec: str) -> MAEConfig:
    """A preset name with optional field overrides: "camae_vit_micro_patch16_256:img_size=128,in_chans=3"."""
    name, _, rest = spec.partition(":")
    overrides = {}
    fields = MAEConfig.__dataclass_fields__
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"bad override {item!r} in preset {spec!r}: use key=value with a MAEConfig field")
        kind = type(fields[key].default)
        if kind is bool:
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            overrides[key] = kind(value)
        else:
            raise ValueError(f"override {key!r} in preset {spec!r} is not a number or flag")
    return get_config(name.strip(), **overrides)


def parse_stacks(text: str) -> list[Stack]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in STACKS]
    if bad or not names:
        raise ValueError(f"unknown stack(s) {bad}; choose from {', '.join(STACKS)}")
    return [STACKS[n] for n in names]


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return device


def default_amp(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs (the paper's setting); plain fp32 on CPUs, where bf16 is emulated and slow."""
    return torch.bfloat16 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes: CUDA events on a GPU, the host clock (work is synchronous) on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_matmul_ceiling(device: torch.device, size: int | None = None, repeats: int | None = None) -> dict:
    """The device's practical matmul rate. CUDA: a size^3 bf16 product (default 8192) timed with CUDA events, the
    median after warm-up. CPU: an fp32 product (default 1024) on the host clock, the fastest repeat (a shared CPU's
    median measures its neighbours). Random inputs, rotated between two sets."""
    if device.type == "cuda":
        dtype, size, repeats, warmup, statistic = torch.bfloat16, size or 8192, repeats or 10, 3, "median"
    else:
        dtype, size, repeats, warmup, statistic = torch.float32, size or 1024, repeats or 7, 1, "min"
    gen = torch.Generator(device=device).manual_seed(1234)
    pairs = [(torch.randn(size, size, device=device, dtype=dtype, generator=gen),
              torch.randn(size, size, device=device, dtype=dtype, generator=gen)) for _ in range(2)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    for i in range(warmup):
        torch.mm(*pairs[i % 2], out=out)
    synchronize(device)
    times = [time_call(lambda i=i: torch.mm(*pairs[i % 2], out=out), device) for i in range(repeats)]
    seconds = statistics.median(times) if statistic == "median" else min(times)
    return {
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": [size, size, size],
        "repeats": repeats,
        "statistic": statistic,
        "seconds": seconds,
        "tflops": 2 * size**3 / seconds / 1e12,
        "method": "CUDA events" if device.type == "cuda" else "host clock",
    }


def refresh_cpu_ceiling(payload: dict, device: torch.device) -> None:
    """On a CPU, measure the ceiling again after the run and keep the higher of the two (a busy machine at the
    start would otherwise inflate every MFU); MFUs are recomputed against it."""
    if device.type != "cpu":
        return
    again = measure_matmul_ceiling(device)
    if again["tflops"] <= payload["ceiling"]["tflops"]:
        return
    again["note"] = "higher of the measurements before and after the run"
    payload["ceiling"] = again
    for rec in payload["train"] + payload["inference"]:
        if rec.get("achieved_tflops") is not None:
            rec["mfu"] = rec["achieved_tflops"] / again["tflops"]
    if payload.get("paper_comparison"):
        payload["paper_comparison"] = paper_comparison(payload["train"], payload["ratios"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or "cpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - optional probe
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _dali_version() -> str | None:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


COMMIT_FILE = "benchmarks/.commit"  # written by `bash benchmarks/gpu.sh --prepare` (git-ignored; carried)


def _git_commit(root: str | None = None, environ=None) -> dict:
    """The checkout's commit: from git; in a copy without .git from MAE_FAST_GIT_COMMIT, then benchmarks/.commit."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__)))
    environ = os.environ if environ is None else environ
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if head.returncode == 0:
            # dirty: the measured code differs from the commit (changed or new files; results do not count)
            status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "mae_fast", "kernels", "csrc",
                                     "setup.py", "benchmarks", ":!benchmarks/results", ":!" + COMMIT_FILE],
                                    capture_output=True, text=True, timeout=20)
            return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    # a copy of the tree without .git (e.g. on a lent GPU): the caller may pass the commit in, or
    # `bash benchmarks/gpu.sh --prepare` wrote it next to the script before the tree was copied
    env = environ.get("MAE_FAST_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "MAE_FAST_GIT_COMMIT"}
    try:
        with open(os.path.join(root, COMMIT_FILE)) as f:
            prepared = json.load(f)
        return {"commit": str(prepared["commit"]), "dirty": prepared.get("dirty"), "source": COMMIT_FILE,
                "prepared": prepared.get("date")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"commit": "unknown", "dirty": None, "source": "none"}


def command_line() -> str:
    """How this process was started, as a user would type it."""
    prog = os.path.basename(sys.argv[0])
    if prog == "bench.py":
        prog = "python -m mae_fast.bench"
    elif prog == "__main__.py":  # python -m <package>
        prog = f"python -m {os.path.basename(os.path.dirname(sys.argv[0]))}"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def provenance(device: torch.device, command: str | None = None) -> dict:
    """Where and with what a result was measured."""
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "device": device_name(device),
        "device_type": device.type,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "device_memory_bytes": props.total_memory if props else None,
        "driver": _driver_version() if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton"),
        "dali": _dali_version(),
        "flash_attn": _dist_version("flash-attn", "flash_attn"),
        "mae_fast": mae_fast.__version__,
        "cpp_extension": importlib.util.find_spec("mae_fast._C") is not None,
        "git": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MAE_FAST_") or k == "TRITON_INTERPRET"},
    }


def import_checkout_kernels(folder: str | None = None) -> None:
    """In a source checkout that is not installed, `kernels/` is only importable as `mae_fast.kernels` once mapped
    (setup.py's package_dir does it on install, the root conftest.py under pytest). Do the same here so that
    `python -m mae_fast.bench` from a checkout benchmarks the Triton kernels rather than silently the references.
    With `folder`, map that folder even when another install provides `mae_fast.kernels` (an editable install of a
    different checkout would otherwise win)."""
    if "mae_fast.kernels" in sys.modules:
        return
    if folder is None:
        if importlib.util.find_spec("mae_fast.kernels") is not None:
            return
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location("mae_fast.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mae_fast.kernels"] = module
    spec.loader.exec_module(module)
    mae_fast.kernels = module


# --------------------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------------------


def random_images(cfg: MAEConfig, batch: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Raw uint8 crops (B, C, H, W), uniformly random (never zeros: they hide indexing errors and time faster)."""
    return torch.randint(0, 256, (batch, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                         device=device, generator=generator)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


def compile_fn(fn, backend: str):
    """torch.compile with static shapes (a training loop has one shape; automatic dynamic shapes would retrace
    the same code for every preset, and fail on the masking's torch.rand with a symbolic size)."""
    return torch.compile(fn, backend=backend, dynamic=False)


COMPILE_MODES = ("regional", "model")


def compiled_call(model: torch.nn.Module, fn, stack: Stack, backend: str, mode: str = "regional"):
    """`fn` as the stack runs it: eager; or, for a compiled stack, with every transformer block compiled
    (mode "regional": compile time per block type, `mae_fast.compiling`) or the whole call compiled ("model")."""
    if not stack.compiled:
        return fn
    if mode == "regional":
        compile_blocks(model, backend)
        return fn
    if mode == "model":
        return compile_fn(fn, backend)
    raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")


def reset_compiled() -> None:
    """Forget compiled code of earlier runners: Dynamo keeps a few entries per code object and silently falls back
    to eager beyond its limit, which would mislabel a compiled stack."""
    import torch._dynamo

    torch._dynamo.reset()


def dynamo_counts() -> dict:
    """Graphs compiled and graph breaks since the last reset of Dynamo's counters."""
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_model(cfg: MAEConfig, stack: Stack, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The stack's model with the weights every stack of the run shares (seeded; the peer gets them copied)."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute for ViT-L on a CPU
        model = MaskedAutoencoder(cfg)
        if stack.peer:
            model = peer_mod.PeerMAE(cfg).load_from(model)
    return model


class TrainRunner:
    """One train step (forward + masked loss, backward, Lion step) of `cfg` on random crops, run with `stack`."""

    def __init__(self, cfg: MAEConfig, stack: Stack, batch: int, device: torch.device,
                 amp: torch.dtype | None = None, compile_backend: str = "inductor", seed: int = 0,
                 compile_mode: str = "regional"):
        self.cfg, self.stack, self.batch, self.device, self.amp = cfg, stack, batch, device, amp
        self.compile_backend = compile_backend if stack.compiled else None
        self.model = build_model(cfg, stack, device, seed).train()
        if stack.peer:
            self.optimizer = peer_mod.peer_optimizer(self.model)
        else:
            self.optimizer = Lion(lion_param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  impl=stack.optimizer_impl)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.images = [random_images(cfg, batch, device, gen) for _ in range(2)]  # rotated between steps
        self.loss_fn = compiled_call(self.model, self._loss, stack, compile_backend, compile_mode)
        self.steps = 0
        self.last_loss: torch.Tensor | None = None

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out if self.stack.peer else out.loss

    def step(self, images: torch.Tensor | None = None) -> None:
        if images is None:
            images = self.images[self.steps % len(self.images)]
        with stack_context(self.stack):
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(self.device, self.amp):
                loss = self.loss_fn(images)
            loss.backward()
            self.optimizer.step()
        self.steps += 1
        self.last_loss = loss.detach()

    def step_synced(self) -> None:
        self.step()
        synchronize(self.device)

    def persistent_bytes(self) -> int:
        """Parameters and optimiser state: what the stack holds between steps."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return _tensor_bytes(self.model.parameters()) + _tensor_bytes(state)

    def flops_per_crop(self) -> int:
        return flops_mod.training_flops_per_crop(self.cfg)


class InferenceRunner:
    """Embedding crops (no masking, encoder on every token, mean of the patch tokens)."""

    def __init__(self, cfg: MAEConfig, stack: Stack, batch: int, device: torch.device,
                 amp: torch.dtype | None = None, compile_backend: str = "inductor", seed: int = 0,
                 compile_mode: str = "regional"):
        self.cfg, self.stack, self.batch, self.device, self.amp = cfg, stack, batch, device, amp
        self.compile_backend = compile_backend if stack.compiled else None
        self.model = build_model(cfg, stack, device, seed).eval()
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.images = [random_images(cfg, batch, device, gen) for _ in range(2)]
        self.embed_fn = compiled_call(self.model, self.model.embed, stack, compile_backend, compile_mode)
        self.steps = 0
        self.last_loss = None
        self.last_output: torch.Tensor | None = None

    def step(self, images: torch.Tensor | None = None) -> None:
        if images is None:
            images = self.images[self.steps % len(self.images)]
        with stack_context(self.stack), torch.no_grad(), _autocast(self.device, self.amp):
            self.last_output = self.embed_fn(images)
        self.steps += 1

    def step_synced(self) -> None:
        self.step()
        synchronize(self.device)

    def persistent_bytes(self) -> int:
        return _tensor_bytes(self.model.parameters())

    def flops_per_crop(self) -> int:
        return flops_mod.inference_flops_per_crop(self.cfg)


def impls_that_ran() -> dict:
    """The implementation each fused op and the attention used on their latest call."""
    out = {op: ops.last_impl(op) for op in FUSED_OPS}
    out["attention"] = attention_mod.last_backend()
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_memory(device: torch.device) -> None:
    """Return freed blocks to the device after an out-of-memory error or between presets (GPU only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def step_peak_bytes(runner, device: torch.device) -> int | None:
    """Peak device memory one step of `runner` needs: its parameters and optimiser state plus what the step
    allocates on top (activations, gradients, temporaries). Other runners alive at the same time do not count."""
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step_synced()
    return runner.persistent_bytes() + torch.cuda.max_memory_allocated(device) - base


def find_max_batch(make_runner, device: torch.device, start: int, limit: int = 4096,
                   time_cap_s: float = 60.0) -> dict:
    """Largest batch whose step runs: doubling from `start` until a failure, then bisection to ~3%.
    `make_runner(batch)` builds a runner; stops at `limit` or after `time_cap_s` (then the result is a lower bound)."""
    t0 = time.perf_counter()
    runner = make_runner(start)
    gen = torch.Generator(device=device).manual_seed(7)
    ok, failed, note, capped = 0, None, None, False

    def fits(batch: int) -> bool:
        nonlocal note
        error = None
        try:
            runner.step(random_images(runner.cfg, batch, device, gen))
            synchronize(device)
        except RuntimeError as err:  # OOM, or a kernel's launch limit at huge batches
            error = "oom" if _is_oom(err) else f"batch {batch}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        # here the failed step's frames (and the activations they hold) are released
        if hasattr(runner, "optimizer"):
            runner.optimizer.zero_grad(set_to_none=True)
        _free_memory(device)
        if error not in (None, "oom") and note is None:
            note = error
        return error is None

    batch = start
    while True:
        if time.perf_counter() - t0 > time_cap_s:
            capped = True
            break
        if fits(batch):
            ok = batch
            if failed is None:
                if batch >= limit:
                    break
                batch = min(2 * batch, limit)
                continue
        else:
            failed = batch
        if failed is not None:
            if failed - ok <= max(1, failed // 32):
                break
            batch = (ok + failed) // 2
    del runner
    _free_memory(device)
    return {"max_batch": ok or None, "first_failing_batch": failed, "limit": limit, "capped": capped,
            "search_s": round(time.perf_counter() - t0, 2), "note": note}


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    device: torch.device
    amp: torch.dtype | None
    warmup: int = 2
    iters: int = 5            # timed steps per stack per round
    rounds: int = 3           # interleaved rounds
    compile_backend: str = "inductor"
    compile_mode: str = "regional"
    max_batch_time_s: float = 45.0
    max_batch_limit: int = 4096
    deadline: float | None = None  # time.monotonic() after which no further measurement starts


class BudgetSpent(Exception):
    """The settings' deadline passed: stop measuring, keep what was measured."""


def check_budget(settings: BenchSettings) -> None:
    if settings.deadline is not None and time.monotonic() > settings.deadline:
        raise BudgetSpent


def batch_for_memory(bytes_at: dict[int, int], available_bytes: int, limit: int = 1024, multiple: int = 8) -> int:
    """Largest batch (a multiple of `multiple`, at most `limit`, at least `multiple`) whose step fits in
    `available_bytes`, from a step's peak bytes measured at two batches {b1: peak1, b2: peak2}: peak memory is
    affine in the batch (fixed part + per-crop activations), so two points give both."""
    if len(bytes_at) < 2:
        raise ValueError("need peak bytes at two different batches")
    (b1, m1), (b2, m2) = sorted(bytes_at.items())[:2]
    per_crop = max(1.0, (m2 - m1) / (b2 - b1))
    fixed = m1 - per_crop * b1
    batch = int((available_bytes - fixed) // per_crop) // multiple * multiple
    return max(multiple, min(limit, batch))


def estimate_train_batch(cfg: MAEConfig, stacks: list[Stack], settings: BenchSettings, fraction: float = 0.7,
                         probe: int = 8) -> dict:
    """The batch for a train-step comparison from a memory estimate, not a search: each eager stack's step peak at
    batches `probe` and 2*`probe` gives its fixed and per-crop bytes; the batch is the largest whose step fits in
    `fraction` of the device memory left once every stack's parameters and optimiser state are resident (they are
    alive together during the interleaved rounds). CPU: 2 crops (CPU memory is the machine's)."""
    device = settings.device
    if device.type != "cuda":
        return {"batch": 2, "method": "fixed on CPU"}
    per_stack, resident = {}, 0
    for stack in (s for s in stacks if not s.compiled):
        check_budget(settings)
        runner = TrainRunner(cfg, stack, probe, device, settings.amp, settings.compile_backend)
        gen = torch.Generator(device=device).manual_seed(11)
        runner.step_synced()  # first step: kernels compiled, optimiser state allocated
        peaks = {}
        for b in (probe, 2 * probe):
            images = random_images(cfg, b, device, gen)
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            runner.step(images)
            synchronize(device)
            peaks[b] = torch.cuda.max_memory_allocated(device) - base
        resident += runner.persistent_bytes()
        per_stack[stack.name] = peaks
        del runner
        _free_memory(device)
    total = torch.cuda.get_device_properties(device).total_memory
    available = int(fraction * total) - resident
    batches = {name: batch_for_memory(peaks, available, limit=settings.max_batch_limit)
               for name, peaks in per_stack.items()}
    return {"batch": min(batches.values()), "method": "memory estimate (two probe steps per stack)",
            "per_stack_batch": batches, "probe_peak_bytes": per_stack, "resident_bytes": resident,
            "device_bytes": total, "fraction": fraction}


def default_batch(cfg: MAEConfig, device: torch.device, kind: str = "train") -> int:
    """CPU: 2 crops. GPU: a power of two giving ~100 TFLOP per step (~0.2 s on an H200), 8..1024."""
    if device.type != "cuda":
        return 2
    per_crop = (flops_mod.training_flops_per_crop(cfg) if kind == "train"
                else flops_mod.inference_flops_per_crop(cfg))
    batch = 2 ** int(math.log2(max(1.0, 100e12 / per_crop)))
    return int(min(1024, max(8, batch)))


def summarise(times: list[float], batch: int, flops_per_crop: int, ceiling_tflops: float | None) -> dict:
    """Throughput, achieved TFLOP/s and MFU from per-step times (seconds)."""
    median = statistics.median(times)
    crops_per_s = batch / median
    achieved = flops_per_crop * crops_per_s / 1e12
    return {
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "timed_steps": len(times),
        "crops_per_s": crops_per_s,
        "crops_per_s_best": batch / min(times),  # robust to a busy machine's spikes
        "flops_per_crop": flops_per_crop,
        "achieved_tflops": achieved,
        "mfu": achieved / ceiling_tflops if ceiling_tflops else None,
    }


def base_record(kind: str, label: str, cfg: MAEConfig, stack: Stack, batch: int, settings: BenchSettings) -> dict:
    return {
        "kind": kind, "preset": label, "stack": stack.name, "batch": batch,
        "device": device_name(settings.device),
        "amp": str(settings.amp).replace("torch.", "") if settings.amp else "fp32",
        "compiled": stack.compiled, "compile_backend": settings.compile_backend if stack.compiled else None,
        "compile_mode": settings.compile_mode if stack.compiled else None,
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
        "mask_ratio": cfg.mask_ratio, "layout": cfg.layout,
    }


def _error_text(err: BaseException, batch: int) -> str:
    if _is_oom(err):
        return f"out of memory at batch {batch}"
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def warm_up(runner, rec: dict, settings: BenchSettings) -> None:
    """First step (compiles, if compiled), warm-up steps, the implementations that ran, a finite loss, peak memory."""
    if runner.stack.compiled:
        from torch._dynamo.utils import counters

        counters.clear()
    t0 = time.perf_counter()
    runner.step_synced()
    rec["first_step_s"] = round(time.perf_counter() - t0, 3)
    if runner.stack.compiled:
        rec["dynamo"] = dynamo_counts()
    for _ in range(settings.warmup):
        runner.step_synced()
    # embedding calls none of the dispatched training ops: report only its attention backend
    if runner.stack.peer:
        rec["impls"] = {"model": "timm", "optimizer": "timm.optim.Lion"}
    elif isinstance(runner, TrainRunner):
        rec["impls"] = impls_that_ran()
    else:
        rec["impls"] = {"attention": attention_mod.last_backend()}
    if runner.last_loss is not None and not torch.isfinite(runner.last_loss).item():
        raise FloatingPointError(f"non-finite loss {runner.last_loss.item()} after warm-up")
    rec["peak_mem_bytes"] = step_peak_bytes(runner, settings.device)


def compare_stacks(kind: str, label: str, cfg: MAEConfig, stacks: list[Stack], batch: int,
                   settings: BenchSettings, ceiling_tflops: float | None,
                   search_max_batch: bool = False) -> tuple[list[dict], list[dict], bool]:
    """Build every stack of one preset, warm each, then time them in interleaved rounds.
    Returns (one record per stack, speed ratios between stacks from the same rounds, interrupted). On Ctrl-C (or
    `timeout -s INT`) what was timed so far is summarised and the rest marked "interrupted"."""
    device = settings.device
    runner_cls = TrainRunner if kind == "train" else InferenceRunner
    records = {stack.name: base_record(kind, label, cfg, stack, batch, settings) for stack in stacks}
    runners: dict[str, object] = {}
    times: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    interrupted = False
    if any(stack.compiled for stack in stacks):
        reset_compiled()
    stopped = "interrupted"
    try:
        for stack in stacks:
            check_budget(settings)
            if _build_and_warm(runner_cls, cfg, stack, batch, settings, records[stack.name], runners):
                times[stack.name], per_round[stack.name] = [], []
        for _ in range(settings.rounds):
            check_budget(settings)
            for name, runner in runners.items():
                t = []
                for _ in range(settings.iters):
                    check_budget(settings)
                    t.append(time_call(runner.step, device))
                times[name].extend(t)
                per_round[name].append(statistics.median(t))
    except KeyboardInterrupt:
        interrupted = True
    except BudgetSpent:
        interrupted, stopped = True, "time budget spent"
    for name, runner in runners.items():
        if times.get(name):
            records[name].update(summarise(times[name], batch, runner.flops_per_crop(), ceiling_tflops), status="ok")
            if device.type == "cpu":  # process-wide high-water mark: an upper bound, not per stack
                records[name]["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for rec in records.values():
        if "status" not in rec:
            rec.update(status="interrupted", error=f"{stopped} before it was timed")
    runner = None
    runners.clear()
    _free_memory(device)
    per_round = {k: v for k, v in per_round.items() if v}  # rounds every timed stack completed
    per_round = {k: v[:min(len(x) for x in per_round.values())] for k, v in per_round.items()} if per_round else {}

    if kind == "train" and not interrupted:
        try:
            for stack in stacks:
                _max_batch(runner_cls, cfg, stack, batch, settings, records[stack.name], search_max_batch)
        except KeyboardInterrupt:
            interrupted = True
    return list(records.values()), ratios_from_rounds(label, kind, per_round), interrupted


def _build_and_warm(runner_cls, cfg, stack, batch, settings, rec, runners) -> bool:
    """Build and warm one stack's runner into `runners`; a failure is recorded in `rec`, never raised."""
    failure = None
    try:
        runner = runner_cls(cfg, stack, batch, settings.device, settings.amp, settings.compile_backend,
                            compile_mode=settings.compile_mode)
        warm_up(runner, rec, settings)
        runners[stack.name] = runner
    except Exception as err:  # noqa: BLE001 - recorded in the results, never dropped
        failure = _error_text(err, batch)
    if failure is None:
        return True
    runner = None
    _free_memory(settings.device)  # after the except block: the failed step's frames are gone
    rec.update(status="error", error=failure)
    return False


def _max_batch(runner_cls, cfg, stack, batch, settings, rec, search: bool) -> None:
    rec["max_batch"] = None
    if rec.get("status") != "ok":
        return
    if settings.device.type != "cuda":
        rec["max_batch_note"] = "not searched on CPU"
    elif stack.compiled:
        rec["max_batch_note"] = "not searched (a compiled step recompiles for every batch size)"
    elif not search:
        rec["max_batch_note"] = "not searched for this preset"
    else:
        result = find_max_batch(
            lambda b: runner_cls(cfg, stack, b, settings.device, settings.amp, settings.compile_backend),
            settings.device, start=batch, limit=settings.max_batch_limit, time_cap_s=settings.max_batch_time_s)
        rec["max_batch"] = result.pop("max_batch")
        rec["max_batch_search"] = result


RATIO_PAIRS = [
    ("fused", "reference"),
    ("fused", "peer"),
    ("fused_compiled", "peer_compiled"),
    ("fused_compiled", "peer"),
    ("reference", "peer"),
    ("fused_compiled", "reference_compiled"),
    ("fused_compiled", "reference"),
    ("fused", "reference_compiled"),
    ("reference_compiled", "reference"),
]


def ratios_from_rounds(preset: str, kind: str, per_round: dict[str, list[float]]) -> list[dict]:
    """Speed ratios (step time of the denominator stack / of the numerator: > 1 means the numerator is faster),
    one per round: median, min, max."""
    out = []
    for num, den in RATIO_PAIRS:
        if num in per_round and den in per_round and per_round[num] and per_round[den]:
            r = [d / n for n, d in zip(per_round[num], per_round[den])]
            out.append({"kind": kind, "preset": preset, "numerator": num, "denominator": den,
                        "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
                        "rounds": len(r)})
    return out


def paper_comparison(train_records: list[dict], ratios: list[dict] | None = None,
                     preset: str = "mae_vit_large_patch8_256") -> dict | None:
    """The paper's ViT-L/8+ run (3.5e9 crops, > 20,000 A100-hours, ~11% MFU) against the fastest measured stack,
    and the issue's targets (MFU >= 50%, >= 1.4x the eager reference, >= 1.15x the compiled reference)."""
    ok = [r for r in train_records if r.get("preset") == preset and r.get("status") == "ok"]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["crops_per_s"])
    paper = flops_mod.paper_run_summary()

    def best_ratio(denominator: str) -> float | None:
        values = [r["ratio_median"] for r in ratios or [] if r["preset"] == preset and r["kind"] == "train"
                  and r["denominator"] == denominator and r["numerator"].startswith("fused")]
        return max(values) if values else None

    targets = {
        "MFU": {"value": best.get("mfu"), "target": 0.5},
        "fused vs eager reference": {"value": best_ratio("reference"), "target": 1.4},
        "fused vs compiled reference": {"value": best_ratio("reference_compiled"), "target": 1.15},
    }
    return {
        "targets": targets,
        "preset": preset,
        "best_stack": best["stack"],
        "measured_crops_per_s": best["crops_per_s"],
        "measured_mfu": best.get("mfu"),
        "device": best["device"],
        "gpu_hours_for_paper_crops": flops_mod.gpu_hours_for(paper["crops"], best["crops_per_s"]),
        "paper_crops": paper["crops"],
        "paper_gpu_hours": paper["gpu_hours"],
        "paper_implied_mfu": paper["implied_mfu_exact"],
        "paper_crops_per_gpu_s": paper["implied_crops_per_gpu_s"],
    }


# --------------------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    name = device_name(device).lower() if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or device.type


def results_path(out: str, device: torch.device) -> str:
    """`out` ending in .json is the file; otherwise a folder for `{device}-{UTC stamp}.json`."""
    if out.endswith(".json"):
        return out
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(out, f"{device_slug(device)}-{stamp}.json")


def write_json(path: str, payload: dict) -> None:
    """Atomic write (a crash never leaves half a file)."""
    from mae_fast.checkpoint import atomic_write_json

    atomic_write_json(path, payload)


def validate_payload(payload: dict) -> None:
    """Raise ValueError naming the first missing field of a results payload."""
    for key in ("schema", "provenance", "ceiling", "train", "inference", "ratios"):
        if key not in payload:
            raise ValueError(f"results payload lacks {key!r}")
    if payload["schema"] != SCHEMA:
        raise ValueError(f"unknown results schema {payload['schema']!r} (expected {SCHEMA})")
    for key in ("date", "command", "device", "torch", "git"):
        if key not in payload["provenance"]:
            raise ValueError(f"provenance lacks {key!r}")
    for rec in payload["train"] + payload["inference"]:
        for key in ("preset", "stack", "batch", "status"):
            if key not in rec:
                raise ValueError(f"record {rec} lacks {key!r}")


# --------------------------------------------------------------------------------------------------------------
# `mae-fast bench`
# --------------------------------------------------------------------------------------------------------------

CPU_PRESETS = ["mae_vit_micro_patch16_256", "camae_vit_micro_patch16_256:img_size=128"]
GPU_PRESETS = [  # the target first: a run cut short by its time budget still measures it
    "mae_vit_large_patch8_256", "mae_vit_small_patch16_256", "mae_vit_base_patch16_256", "mae_vit_base_patch8_256",
    "mae_vit_large_patch16_256", "camae_vit_small_patch16_256",
]
GPU_TARGET_PRESETS = ["mae_vit_large_patch8_256"]  # the target: compiled stacks and max-batch search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--preset", action="append", default=None,
                        help="preset to benchmark, optionally with overrides (name:img_size=128,in_chans=3); "
                             "repeatable or comma-separated; 'all' for every preset. Default: CPU "
                             f"{' '.join(CPU_PRESETS)}; GPU the paper's MAEs and OpenPhenom's CA-MAE")
    parser.add_argument("--batch", type=int, default=None,
                        help="train batch (default: 2 on CPU; on GPU a power of two giving ~100 TFLOP per step)")
    parser.add_argument("--inference-batch", type=int, default=None, help="embedding batch (same defaults)")
    parser.add_argument("--stacks", default=",".join(default_stacks()),
                        help=f"comma list of {', '.join(STACKS)} (default all; the peer's need timm)")
    parser.add_argument("--compile-presets", default=None,
                        help="presets that also run the compiled stacks: comma list, 'all' or 'none' "
                             f"(default: all on CPU; on GPU {', '.join(GPU_TARGET_PRESETS)}: compiling takes minutes)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor on GPU; aot_eager on CPU, where inductor "
                             "spends ~90 s in its C++ build per variant)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="regional",
                        help="regional: each transformer block compiled (compile time per block type); "
                             "model: the whole step compiled")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per stack after the first")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per stack per round (GPU 5, CPU 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the stacks")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step benchmark")
    parser.add_argument("--no-inference", action="store_true", help="skip the embedding benchmark")
    parser.add_argument("--max-batch-presets", default=None,
                        help="presets whose eager stacks get the largest-batch search (GPU only): comma list, "
                             f"'all' or 'none' (default {', '.join(GPU_TARGET_PRESETS)})")
    parser.add_argument("--max-batch-time", type=float, default=45.0, help="seconds per largest-batch search")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; what is left when it runs out is recorded as skipped")
    parser.add_argument("--out", default=None,
                        help="results JSON file, or folder (default benchmarks/results/ in a checkout, else .)")


def _default_out() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__)))
    return os.path.join(root, "benchmarks", "results") if os.path.isdir(os.path.join(root, "benchmarks")) else "."


def split_specs(items: list[str] | None) -> list[str]:
    """Repeatable and comma-separated values; commas inside "name:k=v,k=v" overrides stay with their preset."""
    out: list[str] = []
    for item in items or []:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part and ":" not in part and out and ":" in out[-1]:
                out[-1] += "," + part  # another override of the previous preset
            else:
                out.append(part)
    return out


def _presets_from(args, device: torch.device) -> list[str]:
    specs = split_specs(args.preset) or (CPU_PRESETS if device.type == "cpu" else GPU_PRESETS)
    names: list[str] = []
    for spec in specs:
        if spec == "all":
            names.extend(list_presets())
        else:
            parse_preset(spec)  # fails early, naming the preset or the override
            names.append(spec)
    return list(dict.fromkeys(names))


def preset_set(text: str | None, presets: list[str], default: list[str]) -> set[str]:
    """Presets named by an option: a comma list, "all" (every benchmarked preset), "none", or `default` if unset."""
    if text is None:
        return set(default)
    text = text.strip()
    if text == "all":
        return set(presets)
    if text == "none":
        return set()
    return set(split_specs([text]))


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_summary(payload: dict) -> None:
    c = payload["ceiling"]
    print(f"\nmatmul ceiling: {c['tflops']:.4g} TFLOP/s ({c['dtype']} {c['shape'][0]}^3, {c['device']})")
    for kind in ("train", "inference"):
        recs = payload[kind]
        if not recs:
            continue
        print(f"\n{kind}: {'preset':<42} {'stack':<19} {'batch':>5} {'crops/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'peak mem':>10} {'max batch':>9} attention")
        for r in recs:
            if r.get("status") != "ok":
                print(f"       {r['preset']:<42} {r['stack']:<19} {r['batch']:>5} {r.get('status')}: "
                      f"{r.get('error') or r.get('note', '')}")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(f"       {r['preset']:<42} {r['stack']:<19} {r['batch']:>5} {r['crops_per_s']:>9.2f} "
                  f"{r['achieved_tflops']:>8.3f} {mfu:>6} {_fmt_bytes(r.get('peak_mem_bytes')):>10} "
                  f"{str(r.get('max_batch') or '-'):>9} {r.get('impls', {}).get('attention')}")
    if payload["ratios"]:
        print("\nspeed ratios (same run, interleaved rounds; median [min, max] over rounds):")
        for r in payload["ratios"]:
            print(f"  {r['kind']:<9} {r['preset']:<42} {r['numerator']}/{r['denominator']}: "
                  f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    pc = payload.get("paper_comparison")
    if pc:
        mfu = "-" if pc["measured_mfu"] is None else f"{100 * pc['measured_mfu']:.1f}%"
        print(f"\nViT-L/8 ({pc['best_stack']}): {pc['measured_crops_per_s']:.1f} crops/s on {pc['device']}, MFU {mfu}; "
              f"{pc['gpu_hours_for_paper_crops']:,.0f} device-hours for the paper's {pc['paper_crops']:.2g} crops "
              f"(paper: > {pc['paper_gpu_hours']:,} A100-hours, {pc['paper_crops_per_gpu_s']:.1f} crops/s per GPU, "
              f"~{100 * pc['paper_implied_mfu']:.0f}% MFU)")
        targets = pc.get("targets") or {}
        for name, t in targets.items():
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
            verdict = "" if t["value"] is None else ("met" if t["value"] >= t["target"] else "NOT met")
            print(f"  target {name}: {got} (target >= {t['target']}) {verdict}")


def run(args: argparse.Namespace) -> int:
    import_checkout_kernels()
    try:
        device = resolve_device(args.device)
        stacks = parse_stacks(args.stacks)
        presets = _presets_from(args, device)
    except (RuntimeError, ValueError, KeyError) as err:
        print(f"mae-fast bench: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    amp = {"auto": default_amp(device), "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    settings = BenchSettings(
        device=device, amp=amp, warmup=args.warmup, rounds=args.rounds,
        iters=args.iters or (5 if device.type == "cuda" else 2),
        compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"),
        max_batch_time_s=args.max_batch_time, compile_mode=args.compile_mode,
    )
    compile_presets = preset_set(args.compile_presets, presets,
                                  presets if device.type == "cpu" else GPU_TARGET_PRESETS)
    max_batch_presets = preset_set(args.max_batch_presets, presets, GPU_TARGET_PRESETS)
    path = results_path(args.out or _default_out(), device)
    t_start = time.perf_counter()

    print(f"device {device_name(device)}; measuring the matmul ceiling ...", flush=True)
    ceiling = measure_matmul_ceiling(device)
    payload = {
        "schema": SCHEMA,
        "provenance": provenance(device, getattr(args, "command_line", None)),
        "settings": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v)
                     for k, v in asdict(settings).items()},
        "ceiling": ceiling,
        "train": [],
        "inference": [],
        "ratios": [],
        "skipped": [],
    }
    print(f"ceiling {ceiling['tflops']:.3f} TFLOP/s; results go to {path}", flush=True)

    kinds = [k for k, off in (("train", args.no_train), ("inference", args.no_inference)) if not off]
    interrupted = False
    for kind in kinds:
        for label in presets:
            cfg = parse_preset(label)
            wanted = [s for s in stacks if (not s.compiled or label in compile_presets)
                      and not (s.peer and cfg.channel_agnostic)]  # the peer is the standard MAE only
            if kind == "inference":  # embedding calls none of the dispatched training ops: the default path only
                wanted = [s for s in wanted if s.name.startswith("fused") or s.peer] or wanted[:1]
            batch = (args.batch if kind == "train" else args.inference_batch) or default_batch(cfg, device, kind)
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                payload["skipped"].append({"kind": kind, "preset": label, "reason": "time budget spent"})
                print(f"skip {kind} {label}: time budget spent", flush=True)
                continue
            if interrupted:
                payload["skipped"].append({"kind": kind, "preset": label, "reason": "interrupted"})
                continue
            print(f"{kind} {label} batch {batch}: {', '.join(s.name for s in wanted)}", flush=True)
            records, ratios, interrupted = compare_stacks(kind, label, cfg, wanted, batch, settings,
                                                          ceiling["tflops"], search_max_batch=label in max_batch_presets)
            payload[kind].extend(records)
            payload["ratios"].extend(ratios)
            payload["paper_comparison"] = paper_comparison(payload["train"], payload["ratios"])
            write_json(path, payload)  # after every preset: a run cut short keeps what it measured
            if interrupted:
                print("interrupted: writing what was measured", flush=True)
    refresh_cpu_ceiling(payload, device)
    payload["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_json(path, payload)
    print_summary(payload)
    errors = [r for r in payload["train"] + payload["inference"] if r.get("status") != "ok"]
    if payload["skipped"]:
        print(f"\n{len(payload['skipped'])} (kind, preset) pairs skipped: "
              + ", ".join(f"{s['kind']} {s['preset']} ({s['reason']})" for s in payload["skipped"]))
    if errors:
        print(f"{len(errors)} benchmark(s) failed: see 'error' in the results")
    print(f"\nwrote {path}")
    if interrupted:
        return 130
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast bench", description="End-to-end train/inference benchmarks")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:  # called from Python: record the arguments given, not this process's
        args.command_line = " ".join(["mae-fast bench"] + [shlex.quote(a) for a in argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
