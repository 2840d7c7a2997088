"""Where a benchmark number comes from -- device, driver, library versions, git commit, date, command -- and the
results files that carry it (schema, paths, atomic JSON)."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys

import torch

import mae_fast

SCHEMA = "mae_fast.bench/1"


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


def dist_version(*names: str) -> str | None:
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


def git_commit(root: str | None = None, environ=None) -> dict:
    """The checkout's commit: from git; in a copy without .git from MAE_FAST_GIT_COMMIT, then benchmarks/.commit."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__)))
    environ = os.environ if environ is None else environ
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if head.returncode == 0:
            # dirty: the measured code differs from the commit (changed or new files; results do not count)
            status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "mae_fast", "kernels", "csrc",
                                     "setup.py", "pyproject.toml", "benchmarks", ":!benchmarks/results", ":!" + COMMIT_FILE],
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
        "triton": dist_version("triton", "pytorch-triton"),
        "dali": _dali_version(),
        "flash_attn": dist_version("flash-attn", "flash_attn"),
        "mae_fast": mae_fast.__version__,
        "cpp_extension": importlib.util.find_spec("mae_fast._C") is not None,
        "git": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MAE_FAST_") or k == "TRITON_INTERPRET"},
    }


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
    from mae_fast.io import atomic_write_json

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
