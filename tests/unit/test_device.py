"""The autocast dtype of `amp=auto`: native bf16 detection from /proc/cpuinfo flags, its use by the trainer and the
embedding, the header text, and the matmul ceiling measured in the run's dtype."""
import pytest
import torch

from mae_fast import device as device_module
from mae_fast.device import amp_label, cpu_bf16_units, default_amp
from mae_fast.perf.timing import measure_matmul_ceiling
from mae_fast.training.config import resolve_amp

CPU = torch.device("cpu")
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra} arch_perfmon
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra} arch_perfmon
"""


@pytest.mark.parametrize("extra, units", [
    ("", ()),
    ("avx512_bf16", ("avx512_bf16",)),
    ("amx_tile amx_bf16 amx_int8 avx512_bf16", ("amx_bf16", "avx512_bf16")),
    ("avx512_bf16x", ()),  # whole flags only
])
def test_cpu_bf16_units_reads_the_flags(tmp_path, extra, units):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    assert cpu_bf16_units(str(path)) == units


def test_cpu_bf16_units_without_a_cpuinfo_file(tmp_path):
    assert cpu_bf16_units(str(tmp_path / "missing")) == ()
    (tmp_path / "empty").write_text("processor : 0\n")
    assert cpu_bf16_units(str(tmp_path / "empty")) == ()


@pytest.mark.parametrize("units, expected", [((), None), (("amx_bf16",), torch.bfloat16)])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, units, expected):
    monkeypatch.setattr(device_module, "cpu_bf16_units", lambda: units)
    assert default_amp(CPU) is expected
    assert resolve_amp("auto", CPU) is expected
    assert resolve_amp("bf16", CPU) is torch.bfloat16  # asked for: honoured on any CPU
    assert resolve_amp("fp32", CPU) is None
    label = amp_label(expected, "auto", CPU)
    assert label == ("bf16 (auto: amx_bf16)" if units else "fp32 (auto: no native bf16 on this CPU)")
    assert amp_label(torch.bfloat16, "bf16", CPU) == "bf16" and amp_label(None, "fp32", CPU) == "fp32"


def test_auto_follows_this_machine():
    assert (default_amp(CPU) is torch.bfloat16) == bool(cpu_bf16_units())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_ceiling_in_the_runs_dtype(dtype):
    ceiling = measure_matmul_ceiling(CPU, size=64, repeats=2, dtype=dtype)
    assert ceiling["dtype"] == str(dtype).replace("torch.", "") and ceiling["tflops"] > 0
    assert measure_matmul_ceiling(CPU, size=64, repeats=1)["dtype"] == "float32"  # the CPU's default
