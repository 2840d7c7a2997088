#!/usr/bin/env bash
# One command on a lent GPU, headline first, in under 8 minutes; each stage writes its file the moment it ends
# (and rewrites it after every measurement), at most 8 files in OUTDIR:
#
#   env.json        (a) versions, nvidia-smi, ceilings: bf16 matmul, device copy
#   kernels.json    (b) each fused kernel vs its reference at benchmark sizes: correctness first, then time, fraction
#                       of the byte floor, beside benchmarks/results/kernel_predictions.json ("no prediction" without);
#                       then SDPA's attention backends at the ViT-L/8 shapes, forward + backward
#   train.json      (c) ViT-L/8 MAE train step, eager bf16: fused vs reference vs peer (timm), batch from a memory
#                       estimate; the training loader's crops/s beside it (a few synthetic sites packed raw, read by
#                       the stream `mae-fast train` builds, at the step's batch, to the device; target loader/step
#                       >= 1.5); then CA-MAE ViT-S/16 fused vs reference
#   inference.json  (d) embedding crops/s, ViT-L/8 and CA-MAE ViT-S/16, fused vs peer
#   compiled.json   (e) the same train step with regional (per-block) compilation, only if time is left
#   tests.json      (f) pytest -m "gpu or triton" tests/, summarised (last)
#   log.txt         every stage's output
#   results.md      all of the above as Markdown (benchmarks/headline.py render)
#
# Usage, from anywhere, with nothing installed (the checkout is put on PYTHONPATH):
#   bash benchmarks/gpu.sh --prepare          # here, in the git checkout: writes benchmarks/.commit (git-ignored)
#   bash benchmarks/gpu.sh [OUTDIR]           # there: OUTDIR defaults to $OUT, else benchmarks/results/gpu-<stamp>
# The GPU machine's copy of the tree has no .git: the commit is read from benchmarks/.commit (carry it with the
# tree: it is git-ignored, e.g. the device tool's carry=["benchmarks/.commit"]) or from MAE_FAST_GIT_COMMIT.
# MAE_FAST_GPU_DRYRUN=1 bash benchmarks/gpu.sh OUTDIR runs every stage at toy sizes on the CPU (CI does; so does
# tests/integration/test_gpu_script.py) and produces every file.
# Environment: PYTHON (default python3), BUDGET_S (whole run, default 480), STAGES (default
# "env kernels train infer compiled tests").
# Failure injection (CI proves with it that one failure loses only what it touches; mae_fast/perf/faults.py):
#   MAE_FAST_GPU_FAULT=FAULT[,FAULT...], each FAULT one of
#     STAGE:POINT            raise at that point of the stage: a stack (train:peer, compiled:peer_compiled), an op
#                            (kernels:lion, kernels:attention), a preset (train:camae), the loader (train:loader)
#     deadline:STAGE[:POINT] the stage's deadline passes at that point (default: its second point); the timed
#                            rounds are points too (deadline:train:round2: after the first round was measured)
#     sigterm:STAGE[:POINT]  SIGTERM to the stage and to this script there: the stage keeps what it measured, the
#                            stages after it are marked "not run (SIGTERM)", results.md is still written
#   e.g. MAE_FAST_GPU_DRYRUN=1 MAE_FAST_GPU_FAULT=train:peer,kernels:lion bash benchmarks/gpu.sh OUT
# A SIGTERM or SIGINT to this script (a device lease ending) does the same: the running stage stops and keeps its
# file, the rest are marked, results.md is rendered, exit 143 (TERM) or 130 (INT).
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--prepare" ]; then
    commit="$(git -C "$ROOT" rev-parse HEAD)" || { echo "gpu.sh --prepare: $ROOT is not a git checkout" >&2; exit 2; }
    dirty=false
    [ -n "$(git -C "$ROOT" status --porcelain -- mae_fast kernels csrc setup.py pyproject.toml benchmarks \
        ':!benchmarks/results' ':!benchmarks/.commit')" ] && dirty=true
    printf '{"commit": "%s", "dirty": %s, "date": "%s"}\n' "$commit" "$dirty" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        >"$ROOT/benchmarks/.commit"
    echo "wrote $ROOT/benchmarks/.commit: $(cat "$ROOT/benchmarks/.commit")"
    exit 0
fi

cd "$ROOT"
OUTDIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
DRY="${MAE_FAST_GPU_DRYRUN:-0}"
# the dry run's stages do little but import torch and compile toy models, which takes seconds on an idle CPU but
# minutes on a busy shared one: it gets STAGE_SCALE (default 3) times each stage's limit and a larger budget
if [ "$DRY" = "1" ]; then BUDGET="${BUDGET_S:-1800}"; SCALE="${STAGE_SCALE:-3}"; else BUDGET="${BUDGET_S:-480}"; SCALE=1; fi
STAGES=" ${STAGES:-env kernels train infer compiled tests} "
LOG="$OUTDIR/log.txt"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAE_FAST_GPU_SH_PID=$$
: >"$LOG"
SUMMARY=()
STOPPED=""   # set by a SIGTERM / SIGINT: the stages after the running one are not started
# bash runs the trap once the running stage's pipeline has ended (the stage got the signal too and saved its file)
trap 'STOPPED=SIGTERM' TERM
trap 'STOPPED=SIGINT' INT

say() { echo "$*" | tee -a "$LOG"; }

# a stage that wrote nothing (skipped, or killed before its first write) still leaves a well-formed file saying why
placeholder() {
    local name=$1 file=$2 why=$3
    [ -f "$OUTDIR/$file" ] && return 0
    printf '{"schema": "mae_fast.headline/1", "stage": "%s", "status": "%s", "dryrun": %s}\n' \
        "$name" "$why" "$([ "$DRY" = "1" ] && echo true || echo false)" >"$OUTDIR/$file"
}

if [ -z "${MAE_FAST_GIT_COMMIT:-}" ] && [ ! -f benchmarks/.commit ] && ! git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    say "== warning: no .git, no benchmarks/.commit, no MAE_FAST_GIT_COMMIT: the commit is recorded as unknown"
fi

# stage NAME FILE LIMIT_S [MIN_S]: benchmarks/headline.py NAME under min(LIMIT_S, what is left of the budget),
# skipped when less than MIN_S (default 20) is left. The Python side gets the deadline and checks it before every
# measurement; `timeout -s INT` (the file keeps what was measured) then SIGKILL are the backstops.
stage() {
    local name=$1 file=$2 limit=$(($3 * SCALE)) min=${4:-20}
    case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
    if [ -n "$STOPPED" ]; then
        say "== $name: NOT RUN ($STOPPED)"
        SUMMARY+=("$name=not-run($STOPPED)")
        placeholder "$name" "$file" "not run ($STOPPED received)"
        return 0
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    local t=$((limit < left - 5 ? limit : left - 5))
    if [ "$t" -lt "$min" ]; then
        say "== $name: SKIPPED (${left}s of the budget left)"
        SUMMARY+=("$name=skipped(budget)")
        placeholder "$name" "$file" "skipped: ${left}s of the budget left"
        return 0
    fi
    local deadline=$(($(date +%s) + t - 8))  # margin for writing the file and exiting
    say "== $name (limit ${t}s) -> $file"
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$t" "$PY" benchmarks/headline.py "$name" --out "$OUTDIR/$file" \
        --deadline "$deadline" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    [ "$rc" -eq 124 ] && say "== $name: TIME LIMIT (${t}s) reached; partial results kept"
    placeholder "$name" "$file" "no result: the stage ended (rc=$rc) before its first write"
    say "== $name: rc=$rc in ${took}s"
    SUMMARY+=("$name=rc$rc/${took}s")
}

# limits add to more than the budget on purpose: the optional stages (compiled, tests) get what is left
stage env env.json 45
stage kernels kernels.json 100
stage train train.json 170
stage infer inference.json 70
stage compiled compiled.json 120 60
stage tests tests.json 120

"$PY" benchmarks/headline.py render --dir "$OUTDIR" >>"$LOG" 2>&1 && say "== rendered $OUTDIR/results.md"
say "== total $(($(date +%s) - START))s; stages: ${SUMMARY[*]}"
say "== files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
[ -f "$OUTDIR/results.md" ] && cat "$OUTDIR/results.md"
case "$STOPPED" in SIGTERM) exit 143 ;; SIGINT) exit 130 ;; esac
exit 0
