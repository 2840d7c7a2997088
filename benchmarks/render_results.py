"""Render benchmark result JSONs (schema mae_fast.bench/1, from `mae-fast bench` or the pytest suites) as Markdown.

    python benchmarks/render_results.py                                  # newest result per device, to stdout
    python benchmarks/render_results.py --readme README.md               # replace the README's results block
    python benchmarks/render_results.py results/a.json results/b.json    # these files (or folders)

The README block lies between the lines `<!-- results:begin -->` and `<!-- results:end -->`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SCHEMA = "mae_fast.bench/1"
HERE = os.path.dirname(os.path.abspath(__file__))


def load_results(paths: list[str]) -> list[dict]:
    """Result payloads from files and folders (*.json inside), oldest first; files of other schemas are skipped
    with a message (pytest-benchmark's own JSON, the op suite's)."""
    files: list[str] = []
    for path in paths:
        files.extend(sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path])
    results = []
    for path in files:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"render_results: cannot read {path}: {err}")
        if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
            print(f"render_results: skipping {path} (not a {SCHEMA} result)", file=sys.stderr)
            continue
        payload["_path"] = path
        results.append(payload)
    return sorted(results, key=lambda p: p["provenance"]["date"])


def newest_per_device(results: list[dict]) -> list[dict]:
    """The newest train result and the newest inference result of each device (CPU first, then GPUs)."""
    chosen: dict[tuple, dict] = {}
    for payload in results:
        for kind in ("train", "inference"):
            if payload.get(kind):
                chosen[(payload["provenance"]["device_type"], payload["provenance"]["device"], kind)] = payload
    unique = []
    for key in sorted(chosen, key=lambda k: (k[0] != "cpu", k[1], k[2] != "train")):
        if chosen[key] not in unique:
            unique.append(chosen[key])
    return unique


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _num(x, digits=1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if abs(x) >= 1 else f"{x:.3g}"


def _stack(r: dict) -> str:
    backend = r.get("compile_backend")
    return f"{r['stack']} ({backend})" if backend and backend != "inductor" else r["stack"]


def _ops(impls: dict | None, stack: str = "") -> str:
    """The implementations the step's ops ran; a fused stack's op that ran the reference is a silent fallback,
    named so the table shows it."""
    if not impls:
        return "-"
    ops = sorted({v for k, v in impls.items() if k != "attention" and v})
    fell_back = [k for k, v in impls.items() if stack.startswith("fused") and k != "attention" and v == "reference"]
    return ("/".join(ops) or "-") + (f" (FALLBACK: {', '.join(sorted(fell_back))})" if fell_back else "")


def render_payload(payload: dict) -> str:
    prov, ceil = payload["provenance"], payload["ceiling"]
    git = prov.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"**{prov['device']}** ({prov['device_type']}) — {prov['date']}, torch {prov['torch']}, "
        f"triton {prov.get('triton') or '-'}, driver {prov.get('driver') or '-'}, commit `{commit}`; "
        f"matmul ceiling {_num(ceil['tflops'], 1)} TFLOP/s ({ceil['dtype']}). Command: `{prov['command']}`",
        "",
    ]
    if prov["device_type"] == "cpu":
        lines += ["CPU results check the harness on a small shared machine; they are no speed claim.", ""]
    train = [r for r in payload.get("train", []) if r.get("kind") == "train"]
    if train:
        lines += [
            "crops/s: the step alone on crops already on the device (no loading); MFU: against the matmul ceiling "
            "measured in the run (its dtype above) / against the datasheet dense bf16 peak (n/a: not in the table).",
            "",
            "| Train step | Stack | Batch | crops/s | TFLOP/s | MFU | MFU (datasheet) | Peak mem | Max batch | Attention "
            "| Ops |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in train:
            if r.get("status") != "ok":
                lines.append(f"| {r['preset']} | {r['stack']} | {r.get('batch', '-')} | {r.get('status')}: "
                             f"{r.get('error', '')} | | | | | | | |")
                continue
            datasheet = _pct(r.get("mfu_datasheet")) if r.get("mfu_datasheet") is not None else "n/a"
            lines.append(
                f"| {r['preset']} | {_stack(r)} | {r['batch']} | {_num(r['crops_per_s'])} | "
                f"{_num(r['achieved_tflops'], 2)} | {_pct(r.get('mfu'))} | {datasheet} | "
                f"{_gib(r.get('peak_mem_bytes'))} | "
                f"{r.get('max_batch') or '-'} | {(r.get('impls') or {}).get('attention') or '-'} | "
                f"{_ops(r.get('impls'), r['stack'])} |")
        lines.append("")
    shown = (("fused", "reference"), ("fused_compiled", "reference_compiled"), ("fused_compiled", "reference"),
             ("fused", "peer"), ("fused_compiled", "peer_compiled"))
    ratios = [r for r in payload.get("ratios", []) if (r["numerator"], r["denominator"]) in shown]
    if ratios:
        lines += ["| Preset | Step | Speed ratio (same run) | median | min | max |", "|---|---|---|---:|---:|---:|"]
        for r in ratios:
            lines.append(f"| {r['preset']} | {r['kind']} | {r['numerator']} / {r['denominator']} | "
                         f"{r['ratio_median']:.2f} | {r['ratio_min']:.2f} | {r['ratio_max']:.2f} |")
        lines.append("")
    inference = payload.get("inference", [])
    if inference:
        lines += ["| Embedding | Stack | Batch | crops/s | TFLOP/s | MFU |", "|---|---|---:|---:|---:|---:|"]
        for r in inference:
            if r.get("status") != "ok":
                lines.append(f"| {r['preset']} | {r['stack']} | {r['batch']} | {r.get('status')}: "
                             f"{r.get('error', '')} | | |")
                continue
            lines.append(f"| {r['preset']} | {_stack(r)} | {r['batch']} | {_num(r['crops_per_s'])} | "
                         f"{_num(r['achieved_tflops'], 2)} | {_pct(r.get('mfu'))} |")
        lines.append("")
    pc = payload.get("paper_comparison")
    if pc:
        lines.append(
            f"ViT-L/8 ({pc['best_stack']}): {_num(pc['measured_crops_per_s'])} crops/s, MFU {_pct(pc['measured_mfu'])}"
            f" → {pc['gpu_hours_for_paper_crops']:,.0f} device-hours for the paper's {pc['paper_crops']:.2g} crops "
            f"(paper: > {pc['paper_gpu_hours']:,} A100-hours, ≈{100 * pc['paper_implied_mfu']:.0f}% MFU).")
        for name, t in (pc.get("targets") or {}).items():
            value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
            verdict = "" if t["value"] is None else (" — met" if t["value"] >= t["target"] else " — not met")
            lines.append(f"- target {name} ≥ {t['target']}: {value}{verdict}")
        lines.append("")
    skipped = payload.get("skipped") or []
    if skipped:
        lines.append(f"Skipped (time budget): {', '.join(s['kind'] + ' ' + s['preset'] for s in skipped)}.")
        lines.append("")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    blocks = [render_payload(p) for p in results]
    if not any(p["provenance"]["device_type"] == "cuda" for p in results):
        blocks.append("GPU: not measured on a GPU yet (run `bash benchmarks/gpu.sh` on one).\n")
    return "\n".join(blocks).rstrip() + "\n"


def replace_block(text: str, block: str, where: str = "README") -> str:
    """`text` with the lines between the results markers replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: needs exactly one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="result files or folders (default benchmarks/results/)")
    parser.add_argument("--all", action="store_true", help="every result, not only the newest per device")
    parser.add_argument("--readme", default=None, help="update this file's results block in place")
    args = parser.parse_args(argv)
    results = load_results(args.paths or [os.path.join(HERE, "results")])
    if not results:
        print("render_results: no results found", file=sys.stderr)
        return 1
    block = render(results if args.all else newest_per_device(results))
    if args.readme is None:
        sys.stdout.write(block)
        return 0
    with open(args.readme) as f:
        text = f.read()
    try:
        new_text = replace_block(text, block, args.readme)
    except ValueError as err:
        print(f"render_results: {err}", file=sys.stderr)
        return 2
    tmp = args.readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new_text)
    os.replace(tmp, args.readme)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
