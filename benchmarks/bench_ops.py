"""Per-op benchmarks: the plain-PyTorch reference against the fused kernel (Triton on CUDA, C++ on the CPU).

Sizes: ViT-L/8 MAE on CUDA (256^2 crops, 6 channels, ratio 0.75, batch 256, decoder 512-d in bf16; Lion over all
~329M parameters of mae_vit_large_patch8_256, float32); on the CPU the same per-image sizes at batch 16 and Lion
over mae_vit_small_patch16_256 (48M). Each case reports its time (median), achieved GB/s and the fraction of its
byte floor: every input read once and every output written once (the bytes below), moved at the memory bandwidth
measured in the same run (`copy_bandwidth`: a large copy on a GPU, an in-place add on the CPU).

    pytest benchmarks/bench_ops.py                       # pytest-benchmark, extra_info per case
    pytest benchmarks/bench_ops.py --bench-device cpu --bench-rounds 10
    python benchmarks/bench_ops.py --json OUT.json       # the same cases as JSON with provenance, table on stdout
    python benchmarks/bench_ops.py --device cpu --ops mae_loss,lion_update
    python benchmarks/bench_ops.py --json OUT.json --loss-sweep   # GPU: + loss kernel tile shapes / precisions

Byte floors (B images, C channels, H^2 pixels, L tokens, K visible, D decoder dim, P = p^2 C):
    masked_patchify   raw image + ids_restore read, visible (activation dtype) + target (float32) written, as the
                      train step calls it (no check of the masking: `patchify_as_trained`); "fused" includes the
                      statistics pass (a second read of the image), "fused[stats given]" is the patchify kernel alone
    unshuffle         the decoder's call (class token in place: 1 + K, 1 + L rows), x in the activation dtype,
                      out float32: fwd x (B K D), pos (L D) float32, ids read, out (B L D) float32 written; bwd
                      grad_out (float32), ids read, grad_x written (x's dtype)
    mae_loss          what the train step runs (ops.masked_mae_loss on the decoder's full prediction): masked rows of
                      pred (activation dtype) + target (float32) + masked ids read, grad wrt the full prediction
                      written (forward and backward)
    lion_update       param, grad, exp_avg read; param, exp_avg written
Speed is measured here, never asserted in a test.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mae_fast import ops  # noqa: E402
from mae_fast.device import resolve_device, synchronize  # noqa: E402
from mae_fast.ops.masked_patchify import MaskedPatches, masked_patchify_op, masked_patchify_reference  # noqa: E402
from mae_fast.perf.provenance import provenance  # noqa: E402
from mae_fast.perf.timing import copy_bandwidth, time_median  # noqa: E402
from mae_fast.ops.triton import kernels_module  # noqa: E402
from mae_fast.io import atomic_write_json  # noqa: E402

kernels_module()  # this checkout's kernels/ as mae_fast.kernels (as setup.py installs them)

OPS = ("masked_patchify", "unshuffle", "mae_loss", "lion_update")


@dataclass(frozen=True)
class Sizes:
    batch: int
    channels: int = 6
    img: int = 256
    patch: int = 8
    ratio: float = 0.75
    decoder_dim: int = 512
    act_dtype: torch.dtype = torch.bfloat16     # decoder activations / predictions under autocast
    pixel_dtype: torch.dtype = torch.uint16     # RxRx3 16-bit crops
    lion_model: str = "mae_vit_large_patch8_256"

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2

    @property
    def visible(self) -> int:
        return ops.num_visible(self.tokens, self.ratio)

    @property
    def token_size(self) -> int:
        return self.patch * self.patch * self.channels


CUDA_SIZES = Sizes(batch=256)
CPU_SIZES = Sizes(batch=16, lion_model="mae_vit_small_patch16_256")
TOY_SIZES = Sizes(batch=2, img=64, lion_model="mae_vit_micro_patch16_256")  # pytest --bench-toy: runs, not speed


@dataclass
class Case:
    op: str
    impl: str                    # "reference", "foreach", "fused", "fused[stats given]"
    bytes: int                   # byte floor of the op (see module docstring)
    run: Callable[[], object]
    info: dict = field(default_factory=dict)


def _fused_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def _has_fused(op: str, device: torch.device) -> bool:
    return _fused_name(device) in ops.available_impls(op)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _images(s: Sizes, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    top = 256 if s.pixel_dtype == torch.uint8 else 65536
    x = torch.randint(0, top, (s.batch, s.channels, s.img, s.img), generator=g, dtype=torch.int32)
    return x.to(s.pixel_dtype).to(device)


# --------------------------------------------------------------------------------------------------------------
# cases per op (inputs are built when the op is benchmarked and freed afterwards)
# --------------------------------------------------------------------------------------------------------------

def patchify_as_trained(images: torch.Tensor, s: Sizes, masking, impl: str, stats=None):
    """The masked patchify a train step runs, no more: the step draws its masking inside `ops.masked_patchify`
    (torch.rand + argsort, not the op's bytes; drawn here once beforehand) and never checks its own draw, so the
    public entry's `check_masking` (three host syncs, for caller-made maskings) is left out by calling the torch op
    directly; visible tokens in the autocast dtype (`s.act_dtype`), the target float32. `impl`: "reference", or the
    kernel the dispatcher runs for the images' device (`_fused_name`: the torch op picks it by device)."""
    if impl == "reference":
        return masked_patchify_reference(images, s.patch, masking, "standard", stats, s.act_dtype)
    mean, rstd = (None, None) if stats is None else stats
    visible, target = masked_patchify_op(images, masking.ids_restore, masking.len_keep, s.patch, False, mean, rstd,
                                         s.act_dtype)
    return MaskedPatches(visible, target, masking)


def masked_patchify_cases(s: Sizes, device) -> list[Case]:
    images = _images(s, device)
    masking = ops.random_masking(s.batch, s.tokens, s.ratio, device=device)
    P = s.token_size
    # visible (B, K, P) in the activation dtype, target (B, L - K, P) float32 written
    out_bytes = s.batch * s.visible * P * s.act_dtype.itemsize + s.batch * (s.tokens - s.visible) * P * 4
    floor = _nbytes(images, masking.ids_restore) + out_bytes
    cases = [Case("masked_patchify", "reference", floor, lambda: patchify_as_trained(images, s, masking, "reference"))]
    if _has_fused("masked_patchify", device):
        impl = _fused_name(device)
        cases.append(Case("masked_patchify", "fused", floor, lambda: patchify_as_trained(images, s, masking, impl),
                          {"backend": impl, "note": "statistics pass + patchify pass (two reads of the image)"}))
        stats = ops.channel_stats(ops.to_unit_float(images, check_range=False), ops.standardize_eps(images.dtype))
        cases.append(Case("masked_patchify", "fused[stats given]", floor,
                          lambda: patchify_as_trained(images, s, masking, impl, stats),
                          {"backend": impl, "note": "patchify pass alone, statistics from the caller"}))
    return cases


UNSHUFFLE_PREFIX = 1  # the decoder's call: the class token kept in place by the op (MAEDecoder)


def unshuffle_inputs(s: Sizes, device, g: torch.Generator):
    """Random (x, mask_token, pos_embed, ids_restore, grad_out) of the decoder unshuffle at sizes `s`, as MAEDecoder
    calls it under autocast (`prefix=UNSHUFFLE_PREFIX`): x (B, 1 + K, D) in the activation dtype, class token first;
    float32 mask token and positions (1 + L, D); so out and grad_out (B, 1 + L, D) are float32 (the promotion)."""
    B, K, L, D = s.batch, s.visible, s.tokens, s.decoder_dim
    x = torch.randn(B, 1 + K, D, generator=g).to(s.act_dtype).to(device).requires_grad_()
    token = torch.randn(D, generator=g).to(device).requires_grad_()
    pos = torch.randn(1 + L, D, generator=g).to(device)
    ids = torch.argsort(torch.rand(B, L, generator=g), dim=1).to(device)
    out_dtype = torch.promote_types(s.act_dtype, torch.float32)
    grad_out = torch.randn(B, 1 + L, D, generator=g).to(out_dtype).to(device)
    return x, token, pos, ids, grad_out


def unshuffle_cases(s: Sizes, device) -> list[Case]:
    x, token, pos, ids, grad_out = unshuffle_inputs(s, device, torch.Generator().manual_seed(1))
    # forward: x, pos, ids, mask token read, out written; backward: grad_out, ids read, grad_x, token grad written
    floor = 2 * (_nbytes(x) + _nbytes(grad_out) + _nbytes(ids) + _nbytes(token)) + _nbytes(pos)

    def run(impl):
        out = ops.unshuffle(x, token, ids, pos, impl=impl, prefix=UNSHUFFLE_PREFIX)
        return torch.autograd.grad(out, (x, token), grad_out)

    cases = [Case("unshuffle", "reference", floor, lambda: run("reference"), {"pass": "forward+backward"})]
    if _has_fused("unshuffle", device):
        impl = _fused_name(device)
        cases.append(Case("unshuffle", "fused", floor, lambda: run(impl),
                          {"backend": impl, "pass": "forward+backward"}))
    return cases


def mae_loss_inputs(s: Sizes, device, g: torch.Generator):
    """(pred, target, masking) as the model's train step calls `ops.masked_mae_loss`: the decoder's full prediction
    (B, L, P) in the activation dtype, the float32 target of the masked tokens (B, L - K, P), the step's masking."""
    pred = torch.randn(s.batch, s.tokens, s.token_size, generator=g).to(s.act_dtype).to(device).requires_grad_()
    target = torch.randn(s.batch, s.tokens - s.visible, s.token_size, generator=g).to(device)
    masking = ops.random_masking(s.batch, s.tokens, s.ratio, device=device)
    return pred, target, masking


def mae_loss_cases(s: Sizes, device) -> list[Case]:
    """The loss as the train step runs it (`ops.masked_mae_loss` on the full prediction, forward + backward), so
    the case and kernel_predictions' "mae_loss.full_prediction" describe the same work."""
    pred, target, masking = mae_loss_inputs(s, device, torch.Generator().manual_seed(2))
    M = s.tokens - s.visible
    # masked rows of pred and the target read, the masked ids read, the gradient wrt the full prediction written
    floor = (s.batch * M * s.token_size * (pred.element_size() + 4) + s.batch * M * 8
             + s.batch * s.tokens * s.token_size * pred.element_size())

    def run(impl):
        loss = ops.masked_mae_loss(pred, target, masking, patch_size=s.patch, layout="standard", alpha=0.01,
                                   impl=impl)
        return torch.autograd.grad(loss, pred)

    cases = [Case("mae_loss", "reference", floor, lambda: run("reference"), {"pass": "forward+backward"})]
    if _fused_name(device) in ops.available_impls("masked_mae_loss"):
        impl = _fused_name(device)
        cases.append(Case("mae_loss", "fused", floor, lambda: run(impl), {"backend": impl, "pass": "forward+backward"}))
    return cases


def lion_shapes(model_name: str) -> list[torch.Size]:
    from mae_fast.models import create_model

    with torch.device("meta"):
        model = create_model(model_name)
    return [p.shape for p in model.parameters() if p.requires_grad]


def lion_update_cases(s: Sizes, device) -> list[Case]:
    shapes = lion_shapes(s.lion_model)
    g = torch.Generator(device=device).manual_seed(3)
    params = [torch.randn(sh, device=device, generator=g) for sh in shapes]
    grads = [torch.randn(sh, device=device, generator=g) for sh in shapes]
    moms = [torch.randn(sh, device=device, generator=g) * 0.01 for sh in shapes]
    floor = 2 * _nbytes(*params) + _nbytes(*grads) + 2 * _nbytes(*moms)
    numel = sum(p.numel() for p in params)
    info = {"model": s.lion_model, "tensors": len(params), "parameters": numel}

    def run(impl):
        ops.lion_update(params, grads, moms, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.05, impl=impl)

    cases = [Case("lion_update", "reference", floor, lambda: run("reference"), dict(info)),
             Case("lion_update", "foreach", floor, lambda: run("foreach"), dict(info))]
    if _has_fused("lion_update", device):
        impl = _fused_name(device)
        cases.append(Case("lion_update", "fused", floor, lambda: run(impl),
                          dict(info, backend=impl, launches_per_step=lion_launches_per_step(run, impl))))
    return cases


def lion_launches_per_step(run, impl: str) -> int | None:
    """Kernel launches of one fused Lion step over one dtype group (Triton's plan says; the C++ op is one call)."""
    if impl != "triton":
        return None
    from mae_fast.kernels import lion

    run(impl)
    return sum(plan.launches_per_step for plan in lion.plans.plans.values())


def loss_config_sweep(s: Sizes, device) -> list[dict]:
    """GPU only: the fused loss kernel (forward with its gradient) under other tile shapes and dot precisions, for
    tuning `kernels/mae_loss.py::_launch_config` on the device at hand."""
    from mae_fast.kernels import mae_loss

    g = torch.Generator().manual_seed(4)
    N = s.tokens - s.visible
    pred = torch.randn(s.batch, N, s.token_size, generator=g).to(s.act_dtype).to(device)
    target = torch.randn(s.batch, N, s.token_size, generator=g).to(device)
    grad = torch.empty_like(pred)
    floor = 2 * _nbytes(pred) + _nbytes(target)
    planes = s.token_size // s.patch**2
    out = []
    if mae_loss.separable(s.patch):  # block_planes = tokens per program
        configs = [(bt, 0, w) for bt in (1, 2, 4) for w in (4, 8)]
    else:
        configs = [(bp, bf, w) for bp in (32, 64, 128) for bf in (16, 32, 64) for w in (4, 8) if bf <= s.patch**2]
    for fwd, adj in (("tf32", "bf16"), ("bf16", "bf16"), ("tf32", "tf32"), ("ieee", "ieee")):
        precision = f"{fwd}/{adj}"
        default = mae_loss._launch_config(s.patch, adj, planes)
        for bp, bf, w in configs if (fwd, adj) == ("tf32", "bf16") else [default]:
            def run():
                return mae_loss.mae_loss_forward_triton(pred, target, None, 1.0 / (s.batch * N), s.patch, planes,
                                                        0.01, grad, dot_precision=fwd, adjoint_precision=adj,
                                                        block_planes=bp, block_freq=bf or None, num_warps=w)
            try:
                t = time_median(run, device)["median_s"]
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for one tile shape: report it
                out.append({"block_planes": bp, "block_freq": bf, "num_warps": w, "precision": precision,
                            "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            out.append({"block_planes": bp, "block_freq": bf, "num_warps": w, "precision": precision,
                        "median_ms": t * 1e3, "achieved_GBps": floor / t / 1e9})
    return out


CASE_BUILDERS = {"masked_patchify": masked_patchify_cases, "unshuffle": unshuffle_cases,
                 "mae_loss": mae_loss_cases, "lion_update": lion_update_cases}


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------

def summarise(case: Case, median_s: float, copy_bps: float) -> dict:
    gbps = case.bytes / median_s / 1e9
    return {"op": case.op, "impl": case.impl, "median_ms": median_s * 1e3, "bytes": case.bytes,
            "achieved_GBps": gbps, "floor_ms": case.bytes / copy_bps * 1e3,
            "fraction_of_floor": case.bytes / copy_bps / median_s, **case.info}


def sizes_for(device: torch.device) -> Sizes:
    return CUDA_SIZES if device.type == "cuda" else CPU_SIZES


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(device: torch.device, op_names=OPS, sizes: Sizes | None = None, loss_sweep: bool = False) -> dict:
    sizes = sizes or sizes_for(device)
    copy_bps = copy_bandwidth(device)
    results, ratios = [], []
    for op in op_names:
        cases = CASE_BUILDERS[op](sizes, device)
        medians = {}
        for case in cases:
            timing = time_median(case.run, device)
            medians[case.impl] = timing["median_s"]
            results.append(dict(summarise(case, timing["median_s"], copy_bps), timer=timing["timer"]))
        for impl in medians:
            if impl.startswith("fused") and "reference" in medians:
                ratios.append({"op": op, "fused": impl, "speedup_vs_reference": medians["reference"] / medians[impl]})
        del cases
        _free(device)
    sweep = loss_config_sweep(sizes, device) if loss_sweep and device.type == "cuda" else None
    return {
        "schema": "mae_fast.bench_ops/1",
        "provenance": provenance(device, " ".join(sys.argv)),
        "sizes": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in sizes.__dict__.items()},
        "copy_GBps": copy_bps / 1e9,
        "results": results,
        "speedups": ratios,
        "loss_config_sweep": sweep,
    }


def print_table(payload: dict) -> None:
    print(f"device {payload['provenance']['device']}; memory bandwidth {payload['copy_GBps']:.1f} GB/s")
    print(f"{'op':<16} {'impl':<20} {'median ms':>10} {'GB/s':>9} {'floor ms':>9} {'of floor':>9}")
    for r in payload["results"]:
        print(f"{r['op']:<16} {r['impl']:<20} {r['median_ms']:10.3f} {r['achieved_GBps']:9.1f} "
              f"{r['floor_ms']:9.3f} {100 * r['fraction_of_floor']:8.1f}%")
    for r in payload["speedups"]:
        print(f"speedup {r['op']:<16} {r['fused']:<20} {r['speedup_vs_reference']:6.2f}x vs reference")
    for r in payload.get("loss_config_sweep") or []:
        cfg = f"planes {r['block_planes']:>2} freq {r['block_freq']:>2} warps {r['num_warps']} {r['precision']:<6}"
        print(f"loss kernel {cfg}: " + (f"{r['median_ms']:.3f} ms {r['achieved_GBps']:.0f} GB/s" if "median_ms" in r
                                        else r["error"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results (with provenance) to this file")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cpu")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--batch", type=int, default=None, help="override the batch of the per-image ops")
    parser.add_argument("--loss-sweep", action="store_true",
                        help="CUDA: also time the fused loss kernel over tile shapes and dot precisions")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    op_names = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(op_names) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    sizes = sizes_for(device)
    if args.batch:
        sizes = Sizes(**{**sizes.__dict__, "batch": args.batch})
    payload = run_all(device, op_names, sizes, loss_sweep=args.loss_sweep)
    print_table(payload)
    if args.json:
        atomic_write_json(args.json, payload)
        print(f"results: {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# pytest-benchmark suites: one test per (op, implementation), grouped by op
# --------------------------------------------------------------------------------------------------------------

def _pytest_cases():
    out = []
    for op in OPS:
        impls = ["reference", "fused"] + (["fused[stats given]"] if op == "masked_patchify" else []) \
            + (["foreach"] if op == "lion_update" else [])
        out += [(op, impl) for impl in impls]
    return out


_CASES = _pytest_cases()
_SESSION: dict = {}

try:
    import pytest
except ImportError:  # script mode without pytest installed
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def copy_bps(bench_torch_device):
        return copy_bandwidth(bench_torch_device)

    @pytest.mark.parametrize("op,impl", _CASES, ids=[f"{o}-{i}" for o, i in _CASES])
    def test_op(benchmark, copy_bps, op, impl, bench_torch_device, bench_toy, pytestconfig):
        """--bench-device picks the device, --bench-rounds the rounds; --bench-toy runs TOY_SIZES."""
        device = bench_torch_device
        sizes = TOY_SIZES if bench_toy else sizes_for(device)
        if _SESSION.get("op") != op:  # build one op's inputs at a time
            _SESSION.clear()
            _free(device)
            _SESSION.update(op=op, cases={c.impl: c for c in CASE_BUILDERS[op](sizes, device)})
        case = _SESSION["cases"].get(impl)
        if case is None:
            pytest.skip(f"no {impl} implementation of {op} on {device.type} (extension / Triton not available)")
        case.run()  # warm-up (compilation, allocator)
        synchronize(device)

        def call():
            case.run()
            synchronize(device)

        benchmark.group = op
        rounds = pytestconfig.getoption("--bench-rounds") or (1 if bench_toy else 20 if device.type == "cuda" else 5)
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0 if bench_toy else 1)
        if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
            return
        summary = summarise(case, benchmark.stats.stats.median, copy_bps)
        benchmark.extra_info.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
                                    device=str(device), copy_GBps=copy_bps / 1e9)


if __name__ == "__main__":
    sys.exit(main())
