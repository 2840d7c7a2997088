#!/usr/bin/env bash
# One command on a lent GPU: GPU tests, per-op benchmarks, end-to-end train/inference benchmarks, the pytest-benchmark
# suites and the data benchmarks, in under 10 minutes, everything written into one folder (at most 8 files):
#
#   env.txt        nvidia-smi, library versions          train.json      mae-fast bench: train step, all stacks
#   log.txt        every stage's output                  inference.json  mae-fast bench: embedding, every preset
#   ops.json       benchmarks/bench_ops.py               suites.json     pytest-benchmark suites (same schema)
#   data.json      benchmarks/bench_data.py              results.md      the README table rendered from the above
#
# Usage (from anywhere; no install needed, the checkout is put on PYTHONPATH):
#   MAE_FAST_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu.sh [OUTDIR]
# OUTDIR defaults to $OUT when set (the lent-device tool), else benchmarks/results/gpu-<UTC stamp>.
# Environment: PYTHON (default python3), BUDGET_S (whole-run budget, default 570), STAGES (default
# "env tests train ops infer suites data"; e.g. STAGES="train infer" to rerun part), TRAIN_ARGS / INFER_ARGS (extra
# `mae-fast bench` arguments, e.g. TRAIN_ARGS="--compile-presets none"). A stage that would not fit in what is left
# of the budget is skipped and reported; each stage also has its own time limit.
# Afterwards: copy train.json and inference.json into benchmarks/results/ and run
#   python benchmarks/render_results.py --readme README.md
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET_S:-570}"
STAGES=" ${STAGES:-env tests train ops infer suites data} "
LOG="$OUTDIR/log.txt"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${MAE_FAST_GIT_COMMIT:-}" ] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    export MAE_FAST_GIT_COMMIT="$(git -C "$ROOT" rev-parse HEAD)"
fi
: >"$LOG"
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, what is left of the budget); SIGINT first, so the
# Python harnesses keep the results they have written so far.
stage() {
    local name=$1 limit=$2
    shift 2
    case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET - ($(date +%s) - START)))
    local t=$((limit < left - 10 ? limit : left - 10))
    if [ "$t" -lt 20 ]; then
        say "== $name: SKIPPED (${left}s of the budget left)"
        SUMMARY+=("$name=skipped(budget)")
        return 0
    fi
    say "== $name (limit ${t}s): $*"
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=20 "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    [ "$rc" -eq 124 ] && say "== $name: TIME LIMIT (${t}s) reached; partial results kept"
    say "== $name: rc=$rc in ${took}s"
    SUMMARY+=("$name=rc$rc/${took}s")
}

env_report() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        echo "commit: ${MAE_FAST_GIT_COMMIT:-unknown}"
        nvidia-smi || echo "nvidia-smi failed"
        "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name in ("triton", "flash-attn", "nvidia-dali-cuda130", "pytest", "pytest-benchmark", "timm", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    } >"$OUTDIR/env.txt" 2>&1
    cat "$OUTDIR/env.txt"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
}

BENCH_OUT_TRAIN="$OUTDIR/train.json"
BENCH_OUT_INFER="$OUTDIR/inference.json"

export -f env_report
export PY OUTDIR
stage env 60 bash -c env_report
stage tests 150 "$PY" -m pytest -m "gpu or triton" tests/ -q -p no:cacheprovider -rs --continue-on-collection-errors
# the headline: ViT-L/8 (first) on all four stacks incl. torch.compile, largest batch, then the paper's other MAEs
# shellcheck disable=SC2086  # TRAIN_ARGS / INFER_ARGS are word lists
stage train 270 "$PY" -m mae_fast.bench --device cuda --no-inference --time-budget 200 --max-batch-time 30 \
    --out "$BENCH_OUT_TRAIN" ${TRAIN_ARGS:-}
if [ -f benchmarks/bench_ops.py ]; then
    stage ops 100 "$PY" benchmarks/bench_ops.py --device cuda --json "$OUTDIR/ops.json"
else
    say "== ops: benchmarks/bench_ops.py not present"
fi
stage infer 90 "$PY" -m mae_fast.bench --device cuda --no-train --preset all --compile-presets none \
    --rounds 2 --iters 3 --time-budget 60 --out "$BENCH_OUT_INFER" ${INFER_ARGS:-}
stage suites 75 "$PY" -m pytest benchmarks/bench_train_step.py benchmarks/bench_inference.py -q -p no:cacheprovider \
    -k "not max_batch" --bench-device cuda --bench-presets mae_vit_large_patch8_256,mae_vit_base_patch16_256 \
    --bench-stacks reference,fused --bench-compile-presets none --bench-out "$OUTDIR/suites.json"
if [ -f benchmarks/bench_data.py ]; then
    stage data 60 "$PY" benchmarks/bench_data.py --workers "$(nproc)" --sites-512 16 --sites-2048 4 \
        --out "$OUTDIR/data.json"
fi

RESULTS=()
for f in "$BENCH_OUT_TRAIN" "$BENCH_OUT_INFER" "$OUTDIR/suites.json"; do [ -f "$f" ] && RESULTS+=("$f"); done
if [ ${#RESULTS[@]} -gt 0 ]; then
    "$PY" benchmarks/render_results.py --all "${RESULTS[@]}" >"$OUTDIR/results.md" 2>>"$LOG" \
        && say "== rendered $OUTDIR/results.md"
    cat "$OUTDIR/results.md"
fi
say "== total $(($(date +%s) - START))s; stages: ${SUMMARY[*]}"
say "== results in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
