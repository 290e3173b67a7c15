#!/usr/bin/env bash
# One-shot validation of torch_fastmlp on a machine with an NVIDIA GPU.
#
# Usage (from the repository root):   bash bench/gpu_check.sh
#
# Steps: nvidia-smi, in-place build for the visible GPU, torch_fastmlp.info,
# pytest, compute-sanitizer (memcheck/racecheck/synccheck on a small CUDA
# subset), the full CUDA benchmark, and an optional ncu profile of one fused
# case. Every step is logged to bench/results/gpu-<date>/<step>.log; a failing
# step does not stop later ones, and a summary of exit codes ends the run. The
# exit status is non-zero if build, info, pytest or bench failed (sanitizer and
# ncu failures are logged but tolerated).
#
# Environment knobs:
#   PYTHON        interpreter (default: python)
#   MAX_JOBS      parallel compile jobs (default: 16)
#   BENCH_ARGS    extra arguments for bench.bench_mlp, appended so they override the
#                 defaults (e.g. "--quick" or "--phases fwdbwd --variants fastmlp,compile")
#   SANITIZER_K   pytest -k expression for the sanitizer runs (default: cuda)
#   SANITIZER_TIMEOUT  seconds per sanitizer tool (default: 900)
#   SKIP_BUILD=1  reuse an existing in-place build
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"  # on the lent GPU machines, python3 is the one with torch
export MAX_JOBS="${MAX_JOBS:-16}"
SANITIZER_K="${SANITIZER_K:-cuda}"
SANITIZER_TIMEOUT="${SANITIZER_TIMEOUT:-900}"
OUT="bench/results/gpu-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

declare -a STEP_NAMES=()
declare -a STEP_CODES=()

# run_step NAME CMD...: run CMD with output tee'd to $OUT/NAME.log, record its exit code.
run_step() {
    local name="$1"
    shift
    local log="$OUT/$name.log"
    echo
    echo "=== [$name] $*" | tee "$log"
    local start=$SECONDS code=0
    "$@" 2>&1 | tee -a "$log" || code=${PIPESTATUS[0]}
    echo "=== [$name] exit $code after $((SECONDS - start)) s" | tee -a "$log"
    STEP_NAMES+=("$name")
    STEP_CODES+=("$code")
    return 0
}

# skip_step NAME REASON: record a step that could not run.
skip_step() {
    echo "=== [$1] skipped: $2" | tee "$OUT/$1.log"
    STEP_NAMES+=("$1")
    STEP_CODES+=("skipped")
}

build() {
    # Build for the visible GPU only: an unset arch list lets torch detect it.
    # --no-deps: build against the torch already there (a lent GPU machine may
    # hold another torch release and cannot download the pinned one).
    env -u TORCH_CUDA_ARCH_LIST "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
}

# with_timeout SECONDS CMD...: run CMD under coreutils timeout when available.
with_timeout() {
    local seconds="$1"
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=30 "$seconds" "$@"
    else
        "$@"
    fi
}

# sanitize TOOL: one compute-sanitizer tool over a small CUDA test subset (stop at first failure).
# The caching allocator is disabled so memcheck sees every allocation's real bounds.
sanitize() {
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 with_timeout "$SANITIZER_TIMEOUT" \
        compute-sanitizer --tool "$1" --target-processes all --error-exitcode 1 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider tests -k "$SANITIZER_K"
}

# ncu_one: full metrics for the kernels of one Sequential forward+backward and one
# FusedBCEClassifier step (784-30-1, batch 12396), selected by an NVTX range around
# the last of a few iterations.
ncu_one() {
    local script="$OUT/ncu_case.py"
    cat >"$script" <<'PY'
import copy

import torch
from torch import nn

import torch_fastmlp as fm

base = nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 1)).cuda()
model = fm.Sequential(*copy.deepcopy(list(base)))
loss_fn = fm.BCEWithLogitsLoss()
classifier = fm.FusedBCEClassifier(model)
x = torch.randn(12396, 784, device="cuda")
y = torch.randint(0, 2, (12396, 1), device="cuda").float()
for i in range(4):
    if i == 3:
        torch.cuda.nvtx.range_push("fastmlp")
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    classifier(x, y).backward()
    torch.cuda.synchronize()
    if i == 3:
        torch.cuda.nvtx.range_pop()
print("profiled one Sequential fwd+bwd and one FusedBCEClassifier step")
PY
    ncu --target-processes all --nvtx --nvtx-include "fastmlp/" --launch-count 20 --set full \
        --export "$OUT/ncu-fused" --force-overwrite "$PYTHON" "$script"
}

echo "torch_fastmlp GPU check -> $OUT"
git rev-parse --short HEAD >"$OUT/commit.txt" 2>/dev/null || echo "unknown" >"$OUT/commit.txt"

if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia-smi nvidia-smi
else
    skip_step nvidia-smi "nvidia-smi not found"
fi

if [[ "${SKIP_BUILD:-0}" == "1" ]]; then
    skip_step build "SKIP_BUILD=1"
else
    run_step build build
fi

run_step info "$PYTHON" -m torch_fastmlp.info
run_step pytest "$PYTHON" -m pytest -q tests

if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck synccheck; do
        run_step "sanitizer-$tool" sanitize "$tool"
    done
else
    skip_step sanitizer "compute-sanitizer not found"
fi

# shellcheck disable=SC2086  # BENCH_ARGS is intentionally word-split
run_step bench "$PYTHON" -m bench.bench_mlp --device cuda --dtypes float32,bfloat16,float16 \
    --out "$OUT/bench-cuda.json" ${BENCH_ARGS:-}

if command -v ncu >/dev/null 2>&1; then
    run_step ncu ncu_one
else
    skip_step ncu "ncu not found"
fi

echo
echo "=== summary ($OUT)"
failed=0
for i in "${!STEP_NAMES[@]}"; do
    printf '  %-22s %s\n' "${STEP_NAMES[$i]}" "${STEP_CODES[$i]}" | tee -a "$OUT/summary.txt"
    case "${STEP_NAMES[$i]}:${STEP_CODES[$i]}" in
        *:0 | *:skipped) ;;
        sanitizer-*:* | ncu:* | nvidia-smi:*) ;; # tolerated: logged, not fatal
        *) failed=1 ;;
    esac
done
exit "$failed"
