"""Compile the Triton kernels for a GPU target on any machine (no GPU needed) and report their resources.

    python -m mae_fast.kernels.compile_check            # sm_90 (H100/H200), table on stdout
    python kernels/compile_check.py --arch 80 --json OUT.json

Triton compiles ahead of time with its bundled ptxas, so a CPU-only session can prove that every kernel variant
the launchers use compiles for the GPU (the interpreter cannot: it accepts tile shapes a GPU rejects) and read
registers, spills and shared memory per variant (cuobjdump -res-usage on the cubin) and the 16-byte global
accesses in the PTX. Integer arguments get no divisibility specialisation here (the JIT adds it at launch for
multiples of 16), so vector widths of index-computed accesses are understated. It says nothing about speed.
Must run without TRITON_INTERPRET (the kernels are then JIT functions, not interpreted ones).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_check needs TRITON_INTERPRET unset (run it in its own process)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402


def _kernels():
    from mae_fast.kernels import lion, mae_loss, masked_patchify, unshuffle

    return lion, mae_loss, masked_patchify, unshuffle


def variants() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) of the variants the launchers use at ViT-L/8 MAE sizes."""
    lion, mae_loss, masked_patchify, unshuffle = _kernels()
    out = []
    stats_sig = {"img": "*u16", "mean_out": "*fp32", "rstd_out": "*fp32", "C": "i32", "H": "i32", "W": "i32",
                 "s_b": "i32", "s_c": "i32", "s_h": "i32", "s_w": "i32", "inv_scale": "fp32", "eps": "fp32",
                 "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"}
    out.append(("channel_stats u16", masked_patchify._channel_stats_kernel, stats_sig,
                {"BLOCK_H": 8, "BLOCK_W": 256, "s_w": 1}, {"num_warps": 8}))
    for layout, p in (("standard", 8), ("standard", 16), ("channel", 8), ("channel", 16)):
        for pix in ("u16", "u8", "fp32"):
            if pix != "u16" and (layout, p) != ("standard", 8):
                continue
            sig = {"img": f"*{pix}", "mean": "*fp32", "rstd": "*fp32", "ids_restore": "*i64", "visible": "*fp32",
                   "target": "*fp32", "H": "i32", "W": "i32", "s_b": "i32", "s_c": "i32", "s_h": "i32",
                   "s_w": "i32", "L": "i32", "len_keep": "i32", "inv_scale": "fp32", "C": "constexpr",
                   "PATCH": "constexpr", "CHANNEL_LAYOUT": "constexpr", "BLOCK_T": "constexpr"}
            w = 256 // p
            consts = {"C": 6, "PATCH": p, "CHANNEL_LAYOUT": layout == "channel",
                      "BLOCK_T": min(w, 2048 // (p * p)), "s_w": 1}
            out.append((f"masked_patchify {layout} p{p} {pix}", masked_patchify._masked_patchify_kernel, sig,
                        consts, {"num_warps": 8}))
    for act in ("bf16", "fp32"):
        sig = {"x": f"*{act}", "mask_token": f"*{act}", "ids_restore": "*i64", "pos_embed": f"*{act}",
               "out": f"*{act}", "L": "i32", "K": "i32", "D": "i32", "s_xb": "i32", "s_xk": "i32",
               "HAS_POS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        out.append((f"unshuffle forward {act}", unshuffle._unshuffle_forward_kernel, sig,
                    {"HAS_POS": True, "BLOCK_T": 8, "BLOCK_D": 256}, {}))
        sig = {"grad_out": f"*{act}", "ids_restore": "*i64", "grad_x": f"*{act}", "partial": "*fp32", "L": "i32",
               "K": "i32", "D": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        out.append((f"unshuffle backward {act}", unshuffle._unshuffle_backward_kernel, sig,
                    {"BLOCK_T": 8, "BLOCK_D": 256}, {}))
    for p in (8, 16):
        for pred, precision in (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
            block_pl, block_f, warps = mae_loss._launch_config(p)
            sig = {"pred": f"*{pred}", "target": "*fp32", "token_weight": "*fp32", "grad": f"*{pred}",
                   "partial": "*fp32", "k_re": "*fp32", "k_im": "*fp32", "n_planes": "i32", "P": "i32", "CP": "i32",
                   "uniform_weight": "fp32", "coef_mse": "fp32", "coef_fourier": "fp32", "P2": "constexpr",
                   "BLOCK_PL": "constexpr", "BLOCK_F": "constexpr", "HAS_WEIGHT": "constexpr",
                   "DOT_PRECISION": "constexpr"}
            consts = {"P2": p * p, "BLOCK_PL": block_pl, "BLOCK_F": block_f, "HAS_WEIGHT": False,
                      "DOT_PRECISION": precision}
            out.append((f"mae_loss p{p} pred {pred} {precision}", mae_loss._mae_loss_kernel, sig, consts,
                        {"num_warps": warps}))
    for dts in (("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp32")):
        sig = {"table": "*i64", "n_tensors": "i32", "lr": "fp32", "decay": "fp32", "beta1": "fp32",
               "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "P_DTYPE": "constexpr",
               "G_DTYPE": "constexpr", "M_DTYPE": "constexpr", "LOG2_TENSORS": "constexpr", "BLOCK": "constexpr",
               "ALIGNED": "constexpr"}
        to_tl = {"fp32": tl.float32, "bf16": tl.bfloat16}
        consts = {"P_DTYPE": to_tl[dts[0]], "G_DTYPE": to_tl[dts[1]], "M_DTYPE": to_tl[dts[2]], "LOG2_TENSORS": 9,
                  "BLOCK": lion.BLOCK, "ALIGNED": True}
        out.append((f"lion p/g/m {'/'.join(dts)}", lion._lion_kernel, sig, consts,
                    {"num_warps": lion.NUM_WARPS, "enable_fp_fusion": False}))
    return out


def _runtime_attrs(kernel, sig: dict) -> dict:
    """What the JIT specialises at launch for tensors from torch's allocator: 16-byte aligned pointers."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in sig.items() if kind.startswith("*")}


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of a cubin, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


def check(arch: int = 90, quick: bool = False) -> list[dict]:
    """Compile every variant (or, `quick`, the first variant of each kernel) for sm_`arch`."""
    target = GPUTarget("cuda", arch, 32)
    report = []
    seen = set()
    for name, kernel, sig, consts, options in variants():
        if quick and kernel in seen:
            continue
        seen.add(kernel)
        # integer constexprs passed by value (e.g. unit strides) are specialisations: type "constexpr"
        sig = dict(sig, **{k: "constexpr" for k in consts if k in sig})
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=_runtime_attrs(kernel, sig))
        try:
            compiled = compile(src, target=target, options=options)
        except Exception as err:  # noqa: BLE001 - reported per variant
            report.append({"variant": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        ptx = compiled.asm["ptx"]
        report.append({
            "variant": name, "ok": True, **resource_usage(compiled.asm["cubin"]),
            "dynamic_shared": compiled.metadata.shared,
            "global_loads": len(re.findall(r"ld\.global", ptx)),
            "global_loads_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "global_stores": len(re.findall(r"st\.global", ptx)),
            "global_stores_v4": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
            "mma": bool(re.search(r"\bmma\.|wgmma", ptx)),
        })
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true", help="only the first variant of each kernel")
    args = parser.parse_args(argv)
    report = check(args.arch, args.quick)
    for r in report:
        if r["ok"]:
            print(f"{r['variant']:<40} ok   regs {r.get('reg', '?'):>3}  spill stack {r.get('stack', '?'):>5}  "
                  f"smem {r['dynamic_shared']:>6}  ld.v4 {r['global_loads_v4']:>3}/{r['global_loads']:<3} "
                  f"st.v4 {r['global_stores_v4']:>3}/{r['global_stores']:<3} mma {r['mma']}")
        else:
            print(f"{r['variant']:<40} FAILED {r['error'][:300]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "variants": report}, f, indent=2)
    return 0 if all(r["ok"] for r in report) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mae_fast import bench

    bench.import_checkout_kernels()
    sys.exit(main())
