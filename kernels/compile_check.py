"""Compile the Triton kernels for a GPU target on any machine (no GPU needed) and report their resources.

    python -m mae_fast.kernels.compile_check            # sm_90 (H100/H200), table on stdout
    python kernels/compile_check.py --arch 80 --json OUT.json

Triton compiles ahead of time with its bundled ptxas, so a CPU-only session can prove that every kernel variant
the launchers use compiles for the GPU (the interpreter cannot: it accepts tile shapes a GPU rejects) and read
registers, spills and shared memory per variant (cuobjdump -res-usage on the cubin), the occupancy they allow,
and the SASS opcodes the design relies on (cuobjdump -sass): 128-bit global accesses (LDG.E.128 / STG.E.128, or
128-bit cp.async LDGSTS where a loop is software-pipelined) for the memory-bound kernels, warpgroup MMA (HGMMA) where a DFT product is meant to run on wgmma. Each variant names
what it requires (`REQUIRES`); a variant that spills (stack > 0 or LDL/STL in SASS) or lacks a required opcode
fails the check. Integer arguments the launchers pass as multiples of 16 at ViT-L/8 sizes (`ints` per variant)
get the divisibility specialisation the JIT adds at launch, so vector widths match a real launch.
It says nothing about speed. Must run without TRITON_INTERPRET (the kernels are then JIT functions).

Occupancy (resident warps / 64 per SM on sm_90): blocks per SM = min(32, 64 // warps, 65536 // (warps * 32 *
regs rounded up to 8), 233472 // (shared + 1024)) -- 64 K registers, 228 KB shared memory (1 KB reserved per
block) per multiprocessor.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_check needs TRITON_INTERPRET unset (run it in its own process)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402


def _kernels():
    from mae_fast.kernels import lion, mae_loss, masked_patchify, unshuffle

    return lion, mae_loss, masked_patchify, unshuffle


LDG128, STG128, HGMMA = "LDG.E.128", "STG.E.128", "HGMMA"
LDGSTS128 = "LDGSTS.128"  # any 128-bit cp.async (LDGSTS.E.BYPASS.128, ...): the pipelined loop's loads
SPILL_OPCODES = ("LDL", "STL")


@dataclass
class Variant:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    options: dict
    ints: dict = field(default_factory=dict)   # integer arguments at ViT-L/8 sizes (multiples of 16 specialise)
    requires: tuple = ()                       # SASS opcodes the design relies on
    why: str = ""                              # what is not yet required, and why


def variants() -> list[Variant]:
    """The variants the launchers use at ViT-L/8 MAE sizes (batch 256, 256^2 x 6, decoder 512)."""
    lion, mae_loss, masked_patchify, unshuffle = _kernels()
    out = []
    stats_sig = {"img": "*u16", "partial": "*fp32", "C": "i32", "H": "i32", "W": "i32", "s_b": "i32", "s_c": "i32",
                 "s_h": "i32", "s_w": "i32", "inv_scale": "fp32", "n_tiles_w": "i32", "n_tiles": "i32",
                 "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"}
    block_h, block_w = masked_patchify._stats_tile(256, 256)
    n_tiles = (256 // block_h) * (256 // block_w)
    out.append(Variant("tile_stats u16", masked_patchify._tile_stats_kernel, stats_sig,
                       {"BLOCK_H": block_h, "BLOCK_W": block_w, "s_w": 1}, {"num_warps": 4},
                       ints={"C": 6, "H": 256, "W": 256, "s_b": 6 * 65536, "s_c": 65536, "s_h": 256, "n_tiles_w": 1,
                             "n_tiles": n_tiles},
                       requires=(LDG128,)))
    for layout, p in (("standard", 8), ("standard", 16), ("channel", 8), ("channel", 16)):
        for pix, vis in (("u16", "bf16"), ("u16", "fp32"), ("u8", "bf16"), ("fp32", "bf16")):
            if (pix, vis) != ("u16", "bf16") and (layout, p) != ("standard", 8):
                continue
            sig = {"img": f"*{pix}", "partial": "*fp32", "mean_in": "*fp32", "rstd_in": "*fp32",
                   "ids_restore": "*i64", "visible": f"*{vis}", "target": "*fp32", "H": "i32", "W": "i32",
                   "s_b": "i32", "s_c": "i32", "s_h": "i32", "s_w": "i32", "L": "i32", "len_keep": "i32",
                   "inv_scale": "fp32", "n_tiles": "i32", "eps": "fp32", "C": "constexpr", "C_PAD": "constexpr",
                   "PATCH": "constexpr", "CHANNEL_LAYOUT": "constexpr", "BLOCK_T": "constexpr",
                   "HAS_STATS": "constexpr", "TILES_PAD": "constexpr", "EVEN": "constexpr"}
            w = 256 // p
            block_t = masked_patchify.block_tokens(p, 6, w, layout == "channel")
            consts = {"C": 6, "C_PAD": 8, "PATCH": p, "CHANNEL_LAYOUT": layout == "channel", "BLOCK_T": block_t,
                      "HAS_STATS": False, "TILES_PAD": n_tiles, "EVEN": w % block_t == 0, "s_w": 1}
            L = w * w * (6 if layout == "channel" else 1)
            channel = layout == "channel"
            out.append(Variant(f"masked_patchify {layout} p{p} {pix}->{vis}", masked_patchify._masked_patchify_kernel,
                               sig, consts, {"num_warps": 4},
                               ints={"H": 256, "W": 256, "s_b": 6 * 65536, "s_c": 65536, "s_h": 256, "L": L,
                                     "len_keep": L // 4, "n_tiles": n_tiles},
                               requires=(LDG128,) + ((STG128,) if channel else ()),
                               why="" if channel else "standard-layout tokens interleave 6 channels (p, q, c): a "
                                   "thread's 4 padded channels land at 24-byte strides, so stores are not 128-bit "
                                   "(every 32-byte sector is still written in full by the warp)"))
    D = 512
    # (x dtype, output dtype): the decoder under bf16 autocast (bf16 tokens, float32 mask token and positions: the
    # promoted float32 sequence), float32 training, and a model cast to bf16 throughout
    for act, res in (("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
        sig = {"x": f"*{act}", "mask_token": f"*{res}", "ids_restore": "*i64", "pos_embed": f"*{res}",
               "out": f"*{res}", "L": "i32", "K": "i32", "D": "i32", "s_xb": "i32", "s_xk": "i32", "PREFIX": "i32",
               "HAS_POS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        block_t, block_d = unshuffle._blocks(D)
        out.append(Variant(f"unshuffle forward {act}->{res}", unshuffle._unshuffle_forward_kernel, sig,
                           {"HAS_POS": True, "BLOCK_T": block_t, "BLOCK_D": block_d}, {},
                           ints={"L": 1024, "K": 256, "D": D, "s_xb": 257 * D, "s_xk": D, "PREFIX": 1},
                           requires=(LDG128, STG128)))
        # backward: grad_out in the output dtype, grad_x written in x's
        sig = {"grad_out": f"*{res}", "ids_restore": "*i64", "grad_x": f"*{act}", "token_sums": "*fp32",
               "L": "i32", "K": "i32", "D": "i32", "PREFIX": "i32", "n_tiles": "i32", "n_row_blocks": "i32",
               "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        out.append(Variant(f"unshuffle backward {res}->{act}", unshuffle._unshuffle_backward_kernel, sig,
                           {"BLOCK_T": block_t, "BLOCK_D": block_d}, {},
                           ints={"L": 1024, "K": 256, "D": D, "PREFIX": 1, "n_tiles": 256 * 129, "n_row_blocks": 129},
                           requires=(LDG128, STG128)))
    for pred, fwd, adj, row_map in (("bf16", "tf32", "bf16", False), ("bf16", "tf32", "bf16", True),
                                    ("fp32", "tf32", "bf16", False), ("bf16", "bf16", "bf16", False),
                                    ("fp32", "ieee", "ieee", False)):
        # row_map: the one-op loss on the full prediction (masked_mae_loss_triton)
        fold = " full-pred" if row_map else ""
        sizes8 = {"L": 1024, "M": 768}
        # p = 8: the Kronecker kernel (64-plane tiles); p = 16: the separable kernel, both layouts
        block_pl, block_f, warps = mae_loss._launch_config(8, adj)
        sig = {"pred": f"*{pred}", "target": "*fp32", "token_weight": "*fp32", "grad": f"*{pred}",
               "partial": "*fp32", "k_re": "*fp32", "k_im": "*fp32", "row_ids": "*i64", "n_planes": "i32", "P": "i32",
               "CP": "i32", "uniform_weight": "fp32", "coef_mse": "fp32", "coef_fourier": "fp32", "L": "i32",
               "M": "i32", "P2": "constexpr", "BLOCK_PL": "constexpr", "BLOCK_F": "constexpr",
               "HAS_WEIGHT": "constexpr", "DOT_PRECISION": "constexpr", "ADJ_PRECISION": "constexpr",
               "EMULATE_BF16": "constexpr", "ROW_MAP": "constexpr"}
        consts = {"P2": 64, "BLOCK_PL": block_pl, "BLOCK_F": block_f, "HAS_WEIGHT": False,
                  "DOT_PRECISION": fwd, "ADJ_PRECISION": adj, "EMULATE_BF16": False, "ROW_MAP": row_map}
        tensor_core = () if fwd == "ieee" else ((HGMMA,) if block_pl >= 64 else ("HMMA",))
        out.append(Variant(f"mae_loss kron p8{fold} pred {pred} {fwd}/{adj}", mae_loss._mae_loss_kernel, sig,
                           consts, {"num_warps": warps},
                           ints={"n_planes": 256 * 768 * 6, "P": 6 * 64, "CP": 6, **sizes8},
                           requires=tensor_core,
                           why="stride-6 planes of standard-layout tokens give no 128-bit loads"))
        for layout, cp in (("standard", 6), ("channel", 1)):
            block_tok, _, warps = mae_loss._launch_config(16, adj, cp)
            sig = {"pred": f"*{pred}", "target": "*fp32", "token_weight": "*fp32", "grad": f"*{pred}",
                   "partial": "*fp32", "w_re": "*fp32", "w_im": "*fp32", "row_ids": "*i64", "n_tokens": "i32",
                   "P": "i32", "uniform_weight": "fp32", "coef_mse": "fp32", "coef_fourier": "fp32", "L": "i32",
                   "M": "i32", "CP": "constexpr", "CP_PAD": "constexpr", "PATCH": "constexpr",
                   "BLOCK_TOK": "constexpr", "HAS_WEIGHT": "constexpr", "DOT_PRECISION": "constexpr",
                   "ADJ_PRECISION": "constexpr", "EMULATE_BF16": "constexpr", "ROW_MAP": "constexpr"}
            consts = {"CP": cp, "CP_PAD": 8 if cp == 6 else 1, "PATCH": 16, "BLOCK_TOK": block_tok,
                      "HAS_WEIGHT": False, "DOT_PRECISION": fwd, "ADJ_PRECISION": adj, "EMULATE_BF16": False,
                      "ROW_MAP": row_map}
            L16 = 256 * (6 if layout == "channel" else 1)
            channel = layout == "channel"
            out.append(Variant(f"mae_loss separable p16{fold} {layout} pred {pred} {fwd}/{adj}",
                               mae_loss._mae_loss_separable_kernel, sig, consts, {"num_warps": warps},
                               ints={"n_tokens": 256 * L16 * 3 // 4, "P": 256 * cp, "L": L16, "M": L16 * 3 // 4},
                               requires=(() if fwd == "ieee" else (HGMMA,)) + ((LDG128,) if channel else ()),
                               why="" if channel else "standard-layout tokens interleave 6 planes (p, q, c): "
                                   "loads of a thread's 4 padded planes are not 128-bit"))
    for p in (8, 16):
        sig = {"grad_masked": "*bf16", "grad_loss": "*fp32", "ids_restore": "*i64", "grad_full": "*bf16",
               "n_rows": "i32", "L": "i32", "K": "i32", "P": "i32", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"}
        L = (256 // p) ** 2
        block_r, block_p = mae_loss.scatter_blocks(6 * p * p)
        out.append(Variant(f"scatter_scaled p{p} bf16", mae_loss._scatter_scaled_kernel, sig,
                           {"BLOCK_R": block_r, "BLOCK_P": block_p}, {"num_warps": 4}, ints={"n_rows": 256 * L, "L": L, "K": L // 4, "P": 6 * p * p},
                           requires=(LDG128, STG128)))
    for dts in (("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp32")):
        sig = {"table": "*i64", "block_tensor": "*i32", "scalars": "*fp32", "n_tensors": "i32",
               "P_DTYPE": "constexpr", "G_DTYPE": "constexpr", "M_DTYPE": "constexpr", "BLOCK": "constexpr",
               "ALIGNED": "constexpr"}
        to_tl = {"fp32": tl.float32, "bf16": tl.bfloat16}
        consts = {"P_DTYPE": to_tl[dts[0]], "G_DTYPE": to_tl[dts[1]], "M_DTYPE": to_tl[dts[2]],
                  "BLOCK": lion.BLOCK, "ALIGNED": True}
        out.append(Variant(f"lion p/g/m {'/'.join(dts)}", lion._lion_kernel, sig, consts,
                           {"num_warps": lion.NUM_WARPS, "enable_fp_fusion": False}, ints={"n_tensors": 420},
                           requires=(LDG128, STG128)))
    return out


def _runtime_attrs(kernel, sig: dict, ints: dict) -> dict:
    """What the JIT specialises at launch: 16-byte aligned pointers (torch's allocator) and integer arguments that
    are multiples of 16."""
    names = [n for n, kind in sig.items() if kind.startswith("*")]
    names += [n for n, v in ints.items() if sig.get(n) == "i32" and v % 16 == 0]
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True).stdout


def sass_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts (with modifiers, e.g. LDG.E.128) of the cubin's SASS."""
    text = _cuobjdump(cubin, "-sass")
    return collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text))


def occupancy(regs: int, shared: int, warps: int) -> dict:
    """Blocks and warps resident per sm_90 multiprocessor (see the module docstring)."""
    per_thread = max(8, -(-regs // 8) * 8)
    blocks = min(32, 64 // warps, 65536 // (warps * 32 * per_thread), 233472 // (shared + 1024))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / 64}


def _present(op: str, sass: dict, ops: collections.Counter) -> int:
    """How often a required opcode occurs. 128-bit global loads count in either form: LDG.E.128 into registers, or
    LDGSTS (cp.async) .128 into shared memory, which Triton's software pipeline issues for the next tile of a loop."""
    if op == LDG128:
        return sass[LDG128] + sass[LDGSTS128]
    return sass.get(op, _count(ops, op))


def _count(ops: collections.Counter, prefix: str) -> int:
    return sum(n for op, n in ops.items() if op == prefix or op.startswith(prefix + "."))


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of a cubin, from the cuobjdump that ships with Triton."""
    text = _cuobjdump(cubin, "-res-usage")
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


def check(arch: int = 90, quick: bool = False, only: str | None = None) -> list[dict]:
    """Compile every variant (or, `quick`, the first variant of each kernel; `only`, those whose name contains it)
    for sm_`arch`; each row says whether it compiled (`ok`) and whether it meets its design (`meets`: no spill,
    every required opcode present)."""
    target = GPUTarget("cuda", arch, 32)
    report = []
    seen = set()
    for v in variants():
        if (quick and v.kernel in seen) or (only and only not in v.name):
            continue
        seen.add(v.kernel)
        # integer constexprs passed by value (e.g. unit strides) are specialisations: type "constexpr"
        sig = dict(v.signature, **{k: "constexpr" for k in v.constexprs if k in v.signature})
        src = ASTSource(fn=v.kernel, signature=sig, constexprs=v.constexprs,
                        attrs=_runtime_attrs(v.kernel, sig, v.ints))
        try:
            compiled = compile(src, target=target, options=v.options)
        except Exception as err:  # noqa: BLE001 - reported per variant
            report.append({"variant": v.name, "ok": False, "meets": False,
                           "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        ptx = compiled.asm["ptx"]
        res = resource_usage(compiled.asm["cubin"])
        ops = sass_opcodes(compiled.asm["cubin"])
        warps = compiled.metadata.num_warps
        spills = res.get("stack", 0) + res.get("local", 0) + sum(_count(ops, o) for o in SPILL_OPCODES)
        sass = {k: _count(ops, k) for k in (LDG128, STG128, HGMMA, "HMMA", "LDG", "STG", "LDL", "STL")}
        sass[LDGSTS128] = sum(n for op, n in ops.items() if op.startswith("LDGSTS") and op.endswith(".128"))
        missing = [op for op in v.requires if _present(op, sass, ops) == 0]
        report.append({
            "variant": v.name, "ok": True, "meets": spills == 0 and not missing, **res,
            "dynamic_shared": compiled.metadata.shared, "num_warps": warps,
            **occupancy(res.get("reg", 255), compiled.metadata.shared, warps),
            "spill_bytes_or_ops": spills, "sass": sass, "requires": list(v.requires), "missing": missing,
            "not_required_yet": v.why,
            "ptx_global_loads_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "ptx_global_stores_v4": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
        })
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true", help="only the first variant of each kernel")
    parser.add_argument("--only", help="only the variants whose name contains this")
    args = parser.parse_args(argv)
    report = check(args.arch, args.quick, args.only)
    for r in report:
        if r["ok"]:
            s = r["sass"]
            print(f"{r['variant']:<34} {'ok  ' if r['meets'] else 'MISS'} regs {r.get('reg', '?'):>3} "
                  f"spill {r['spill_bytes_or_ops']:>4} smem {r['dynamic_shared']:>6} occ {r['occupancy']:.2f} "
                  f"LDG128 {s[LDG128]:>2}+{s[LDGSTS128]:>2}async/{s['LDG']:<3} STG128 {s[STG128]:>2}/{s['STG']:<3} "
                  f"HGMMA {s[HGMMA]:>3} HMMA {s['HMMA']:>3}" + (f" missing {r['missing']}" if r["missing"] else ""))
        else:
            print(f"{r['variant']:<40} FAILED {r['error'][:300]}")
    if args.json:
        text = json.dumps({"arch": args.arch, "triton": triton.__version__, "variants": report}, indent=2) + "\n"
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:  # atomic: no import of mae_fast.checkpoint (torch) needed here
            f.write(text)
        os.replace(tmp, args.json)
    return 0 if all(r["ok"] and r["meets"] for r in report) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mae_fast.ops.triton import kernels_module

    kernels_module(os.path.dirname(os.path.abspath(__file__)))  # these kernels, not an install's
    sys.exit(main())
