#!/usr/bin/env bash
# One-shot check of torch_fastmlp on a machine with an NVIDIA GPU, sized for the
# lent H200 (one call of at most 10 minutes; this script aims at <= 8).
#
#   bash bench/gpu_check.sh                                # the real run, from the repository root
#   FASTMLP_GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh    # rehearsal without a GPU (CI runs it)
#
# Steps, each with its own time budget (a step that fails or runs out of time
# never stops the next one):
#   env          python, torch, cores, nvidia-smi
#   build        in-place build for the GPU present only (its capability from torch), MAX_JOBS = cores
#   info         python -m torch_fastmlp.info
#   pytest-cuda  the CUDA tests (pytest -m cuda), interrupted at the budget (pytest then prints what ran)
#   bench        classic workloads, float32 + bfloat16, every variant that runs on the GPU but torch.compile
#   model        bench/perf_model.py --compare on the bench step's JSON: the H200 model's prediction next to
#                every measured row it can match (bench/PERF_MODEL.md), in the log and the summary line
#   memcheck     compute-sanitizer memcheck over SANITIZER_TESTS (below: they reach every CUDA kernel)
#   racecheck    compute-sanitizer racecheck over the same tests
#   bench-compile  torch.compile against eager: one batch size, so one compile per workload and dtype
#   ncu          ncu --clock-control none of the three main kernels (bench/ncu_case.py, 784-30-1 at 2048 rows), if time is left
# The whole run is held to GPU_CHECK_TOTAL_S (default 465 s): a step's budget is
# cut so that the steps after it keep their minimum, and an optional step with
# less than its minimum left is skipped.
#
# Output: summary.md, logs.tar.gz (every step's log), the bench JSON/markdown and
# the ncu report, at most 8 files, into $OUT when it is set (the one folder the
# lent machine brings back), else into bench/results/gpu-<date>/. summary.md and
# logs.tar.gz are rewritten after every step, so a run killed from outside still
# leaves what it did. The last lines printed are the summary table.
# Exit status: 1 if a step other than ncu failed or ran out of time, else 0.
#
# Dry run (FASTMLP_GPU_CHECK_DRY_RUN=1, < 4 minutes, no GPU needed): uses the
# extension already built here, runs info, the pytest selection (its CUDA cases
# skip), the sanitizer test list without compute-sanitizer (proving the node ids
# exist), the benchmarks (torch.compile's left out: a minute of CPU), the model's
# comparison with that CPU bench (mechanics only: its figures are an H200's) and the ncu
# case on the CPU at tiny sizes, and reports the GPU-only parts as skipped; same
# budgets logic, same $OUT handling.
#
# Knobs: PYTHON (default python3), MAX_JOBS, GPU_CHECK_TOTAL_S,
#   GPU_CHECK_BUDGETS="step=seconds,..." (override budgets), GPU_CHECK_STEPS="step,..." (run only these),
#   GPU_CHECK_PHASES / GPU_CHECK_VARIANTS (bench; names bench_mlp lacks are left out with a note),
#   GPU_CHECK_VERBOSE=1 (echo every step's output, not only its log), SKIP_BUILD=1 (reuse a build).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHON="${PYTHON:-python3}" # on the lent GPU machines python3 is the one with torch
export PYTHONUNBUFFERED=1
DRY_RUN="${FASTMLP_GPU_CHECK_DRY_RUN:-0}"
[[ "$DRY_RUN" == 1 ]] || DRY_RUN=0
export DRY_RUN
CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
export MAX_JOBS="${MAX_JOBS:-$CORES}"
VERBOSE="${GPU_CHECK_VERBOSE:-0}"
if [[ "$DRY_RUN" == 1 ]]; then TOTAL="${GPU_CHECK_TOTAL_S:-220}"; else TOTAL="${GPU_CHECK_TOTAL_S:-465}"; fi
T0=$SECONDS

if [[ -n "${OUT:-}" ]]; then
    DEST="$OUT"
elif [[ "$DRY_RUN" == 1 ]]; then
    DEST="bench/results/gpu-dryrun-$(date +%Y%m%d-%H%M%S)"
else
    DEST="bench/results/gpu-$(date +%Y%m%d-%H%M%S)"
fi
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
export DEST WORK LOGS

# Tests that reach every CUDA kernel, for the sanitizer runs (tests/test_gpu_check.py
# and the dry run check that each id exists). Kernel (csrc/cuda/) <- tests:
#   gemm_kernel, direct <- linear_act 33-7, the backward GEMMs, Sequential backward, the generic step;
#     split-K + gemm_reduce_splits_kernel <- linear_act 784-64 (K = 784), dW over 2500-70000 rows;
#     float64 <- linear_act f64; strided operands <- noncontiguous; ReLU mask <- backward_op[True]
#   fused_forward_kernel<32> (first layer <= 32 wide) <- mlp_function 13-17-9 chain, Sequential 65-17-33-65-1;
#     <128> <- half precision 17-33-3 (float16, bfloat16)
#   fused_step_kernel<32> + fused_step_finish_kernel <- fused step 784-30-1, 33-17-9-3, 70000 rows,
#     float64; <128> <- 50-100-10, row tiled 2500-100, half precision; input gradient and frozen layer
#   generic step (GEMMs + BCE kernels) <- 20-200-2, a full [B, C] weight
#   bce_forward_kernel + bce_finish_kernel + bce_backward_kernel <- bce: multichunk, weights, target grad
SANITIZER_TESTS=(
    "tests/test_linear_act.py::test_forward_backward_shapes[33-7-linear-f32-cuda]"
    "tests/test_linear_act.py::test_forward_backward_shapes[784-64-linear_relu-f32-cuda]"
    "tests/test_linear_act.py::test_forward_backward_shapes[33-7-linear_relu-f64-cuda]"
    "tests/test_linear_act.py::test_noncontiguous[weight_transposed_bias_strided-linear_relu-f32-cuda]"
    "tests/test_linear_act.py::test_backward_op_matches_eager[True-cuda]"
    "tests/test_mlp_op.py::test_mlp_function_vs_eager[33-all-False-3-f32-cuda]"
    "tests/test_hardening.py::test_sequential_edge_shapes[cuda-65-17-33-65-1-True]"
    "tests/test_hardening.py::test_sequential_edge_shapes[cuda-2-65-129-33-2-False]"
    "tests/test_hardening.py::test_half_precision_forward_like_eager[cuda-1100-dtype0]"
    "tests/test_hardening.py::test_half_precision_forward_like_eager[cuda-1100-dtype1]"
    "tests/test_fused_step.py::test_matches_eager[cuda-mean-sizes0-2500]"
    "tests/test_fused_step.py::test_matches_eager[cuda-sum-sizes1-300]"
    "tests/test_fused_step.py::test_matches_eager[cuda-mean-sizes2-64]"
    "tests/test_fused_step.py::test_matches_eager[cuda-mean-sizes3-1025]"
    "tests/test_fused_step.py::test_full_weight_takes_generic_path[cuda]"
    "tests/test_fused_step.py::test_float64_and_grad_output_scaling[cuda]"
    "tests/test_fused_step.py::test_input_gradient_and_frozen_layer[cuda]"
    "tests/test_hardening.py::test_classifier_row_tiled_path[cuda-2500-100-mean]"
    "tests/test_hardening.py::test_classifier_many_tiles_uneven_partials[cuda]"
    "tests/test_bce.py::test_large_input_multichunk[cuda]"
    "tests/test_bce.py::test_vs_torch[mean-class-full-BC-f32-cuda]"
    "tests/test_bce.py::test_input_grad_only_and_target_grad_only[sum-cuda]"
    "tests/test_train_step.py::test_device_steps_and_epoch_match_eager[cuda-adam-amsgrad-maximize-0.1]"
    "tests/test_mse.py::test_vs_torch[t-mean-BC-f32-cuda]"
    "tests/test_cross_entropy.py::test_vs_torch[10-mean-0.2-w-index_ignored-f32-cuda]"
)
export SANITIZER_TESTS_LIST="${SANITIZER_TESTS[*]}"

# --- steps -----------------------------------------------------------------
STEPS=(env build info pytest-cuda bench model memcheck racecheck bench-compile ncu)
declare -A BUDGET=([env]=30 [build]=300 [info]=40 [pytest-cuda]=120 [bench]=110 [model]=10 [memcheck]=100
    [racecheck]=80 [bench-compile]=100 [ncu]=75)
# The least a step needs to be worth starting ...
declare -A MIN=([env]=5 [build]=60 [info]=10 [pytest-cuda]=30 [bench]=45 [model]=3 [memcheck]=30 [racecheck]=25
    [bench-compile]=40 [ncu]=30)
# ... and what the steps before it hold back for it (0: optional, runs on what is left).
declare -A RESERVE=([env]=5 [build]=60 [info]=10 [pytest-cuda]=30 [bench]=45 [model]=3 [memcheck]=30
    [racecheck]=25 [bench-compile]=0 [ncu]=0)
if [[ "$DRY_RUN" == 1 ]]; then
    BUDGET=([env]=30 [build]=40 [info]=40 [pytest-cuda]=80 [bench]=80 [model]=10 [memcheck]=60 [racecheck]=20
        [bench-compile]=45 [ncu]=40)
    MIN=([env]=3 [build]=5 [info]=5 [pytest-cuda]=10 [bench]=10 [model]=3 [memcheck]=10 [racecheck]=3
        [bench-compile]=10 [ncu]=5)
    RESERVE=([env]=3 [build]=5 [info]=5 [pytest-cuda]=10 [bench]=10 [model]=3 [memcheck]=10 [racecheck]=3
        [bench-compile]=0 [ncu]=5)
fi
IFS=',' read -r -a _overrides <<<"${GPU_CHECK_BUDGETS:-}"
for _kv in "${_overrides[@]}"; do
    [[ -n "$_kv" ]] || continue
    if [[ "$_kv" =~ ^([a-z-]+)=([0-9]+)$ && -n "${BUDGET[${BASH_REMATCH[1]}]:-}" ]]; then
        _step="${BASH_REMATCH[1]}" _secs="${BASH_REMATCH[2]}"
        BUDGET[$_step]=$_secs
        if ((_secs < ${MIN[$_step]})); then MIN[$_step]=$_secs; fi
    else
        echo "GPU_CHECK_BUDGETS: ignoring '$_kv' (expected step=seconds, step one of ${STEPS[*]})" >&2
    fi
done
SELECTED=",${GPU_CHECK_STEPS:-$(
    IFS=,
    echo "${STEPS[*]}"
)},"

selected() { [[ "$SELECTED" == *",$1,"* ]]; }

# budget_for NAME: the step's budget, cut to what is left once later steps keep their reserve.
budget_for() {
    local name="$1" after=0 reserve=0 s
    for s in "${STEPS[@]}"; do
        if [[ "$after" == 1 ]] && selected "$s"; then reserve=$((reserve + ${RESERVE[$s]})); fi
        [[ "$s" == "$name" ]] && after=1
    done
    local left=$((TOTAL - (SECONDS - T0) - reserve))
    local budget="${BUDGET[$name]}"
    echo $((budget < left ? budget : left))
}

# record NAME STATUS SECONDS BUDGET KEYS: one row of the summary; refresh $DEST.
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$WORK/steps.tsv"
    refresh_out
}

# Each step runs in a fresh bash, strict like this one.
STEP_SHELL='set -euo pipefail; "$@"'

# run_step NAME CMD...: CMD (a command or an exported function) under the step's budget.
run_step() {
    local name="$1"
    shift
    selected "$name" || return 0
    local budget
    budget="$(budget_for "$name")"
    if ((budget < ${MIN[$name]})); then
        echo "[$(date +%H:%M:%S)] $name: skipped, ${budget}s left for it (needs ${MIN[$name]}s)"
        record "$name" skipped 0 "$budget" "no time left (${budget}s < ${MIN[$name]}s)"
        return 0
    fi
    local log="$LOGS/$name.log" start=$SECONDS rc=0 status
    echo "[$(date +%H:%M:%S)] $name: start, budget ${budget}s"
    printf '$ %s\n# budget %ss\n' "$*" "$budget" >"$log"
    if [[ "$VERBOSE" == 1 ]]; then
        timeout --signal=INT --kill-after=15 "$budget" bash -c "$STEP_SHELL" _ "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
    else
        timeout --signal=INT --kill-after=15 "$budget" bash -c "$STEP_SHELL" _ "$@" >>"$log" 2>&1 || rc=$?
    fi
    local secs=$((SECONDS - start))
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    if grep -q '^skip: ' "$log" && [[ "$rc" == 0 ]]; then status=skipped; fi
    local keys
    keys="$("$PYTHON" -m bench.gpu_check_report keys "$name" "$log" "$WORK/$name-$DEVICE.json" 2>&1 | tail -1)" ||
        keys="(no key figures: the report helper failed)"
    if grep -q '^skip: ' "$log"; then keys="$(sed -n 's/^skip: //p' "$log" | head -1)${keys:+; $keys}"; fi
    echo "[$(date +%H:%M:%S)] $name: $status after ${secs}s${keys:+: $keys}"
    if [[ "$status" != ok && "$status" != skipped && "$VERBOSE" != 1 ]]; then tail -n 8 "$log" | sed 's/^/    | /'; fi
    record "$name" "$status" "$secs" "$budget" "$keys"
}

# skip_step NAME REASON: a step that does not apply here.
skip_step() {
    selected "$1" || return 0
    echo "[$(date +%H:%M:%S)] $1: skipped: $2"
    echo "skip: $2" >"$LOGS/$1.log"
    record "$1" skipped 0 - "$2"
}

# refresh_out: summary.md and logs.tar.gz in $DEST, from what has run so far.
refresh_out() {
    tar -czf "$DEST/logs.tar.gz.tmp" -C "$WORK" logs steps.tsv && mv "$DEST/logs.tar.gz.tmp" "$DEST/logs.tar.gz"
    local f
    for f in "$WORK"/bench-*.json "$WORK"/bench-*.md "$WORK"/*.ncu-rep; do
        [[ -f "$f" ]] || continue
        # at most 16 MiB a file comes back: a bigger one stays out, and logs/left-out.log says so
        if (($(stat -c %s "$f") <= 16777216)); then
            cp "$f" "$DEST/"
        elif ! grep -qs "^${f##*/} " "$LOGS/left-out.log"; then
            echo "${f##*/} $(stat -c %s "$f") bytes: over the 16 MiB that come back from \$OUT" >>"$LOGS/left-out.log"
        fi
    done
    "$PYTHON" -m bench.gpu_check_report summary "$WORK/steps.tsv" "$DEST/summary.md" --title "$TITLE" \
        --files "$DEST" --logs "$LOGS" >"$WORK/table.txt" 2>&1 || true
}

# --- what each step runs (exported: run_step starts them under timeout in a new bash) ---
env_step() {
    echo "key: $(uname -n), $CORES cores"
    "$PYTHON" -c 'import platform, torch; print("key: Python", platform.python_version(), "| torch", torch.__version__,
        "CUDA", torch.version.cuda, "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; fi
    for tool in compute-sanitizer ncu; do echo "$tool: $(command -v "$tool" || echo 'not found')"; done
}

build_step() {
    if [[ "$DRY_RUN" == 1 || "${SKIP_BUILD:-0}" == 1 ]]; then
        "$PYTHON" -c 'import torch_fastmlp as f; print("key: existing build reused, WITH_CUDA", f.WITH_CUDA, f.CUDA_ARCHS)'
        return
    fi
    # The GPU present only: its capability as torch reports it (e.g. 9.0 on an H200).
    local arch
    arch="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    echo "key: TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=$MAX_JOBS"
    # In place, with the torch that is here (no pip: the lent machine reaches no registry).
    FASTMLP_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PYTHON" setup.py build_ext --inplace
}

info_step() {
    "$PYTHON" -m torch_fastmlp.info | tee "$WORK/info.txt"
    sed -n 's/^\(CUDA kernels: .*\)/key: \1/p; s/^\(GPU: .*\)/key: \1/p' "$WORK/info.txt"
}

pytest_step() {
    # pytest-xdist (on the lent image) spreads the ~1300 small CUDA tests over 4 processes.
    local parallel=()
    if [[ "$DRY_RUN" != 1 ]] && "$PYTHON" -c 'import xdist' 2>/dev/null; then parallel=(-n 4); fi
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --durations=10 -rfE "${parallel[@]}" tests
}

sanitizer_step() { # sanitizer_step TOOL
    local tests
    read -r -a tests <<<"$SANITIZER_TESTS_LIST"
    if [[ "$DRY_RUN" == 1 && "$1" != memcheck ]]; then
        echo "skip: dry run: compute-sanitizer needs a GPU (the memcheck step ran the test ids)"
        return
    elif [[ "$DRY_RUN" == 1 ]]; then
        echo "skip: dry run: compute-sanitizer needs a GPU; the ${#tests[@]} test ids were run without it"
        "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
        return
    fi
    # No caching allocator: memcheck then sees each allocation's real bounds.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
        "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
}

bench_args() { # the bench's phases and variants: the wanted ones that bench_mlp offers
    local phases variants
    phases="$("$PYTHON" -m bench.gpu_check_report phases "$1")"
    variants="$("$PYTHON" -m bench.gpu_check_report variants "$2")"
    echo "--phases $phases --variants $variants"
}

bench_step() {
    local args
    # TrainStep runs as phase step's fastmlp-trainstep variant; train and epoch, names bench_mlp does not
    # have (bench/bench_train.py times those), are left out with a note.
    args="$(bench_args "${GPU_CHECK_PHASES:-fwd,fwdbwd,step,train,epoch}" \
        "${GPU_CHECK_VARIANTS:-eager,fastmlp,fastmlp-fused,fastmlp-trainstep}")"
    if [[ "$DRY_RUN" == 1 ]]; then
        # shellcheck disable=SC2086  # $args is a list of options
        "$PYTHON" -m bench.bench_mlp --device cpu --workloads 30-10-2 --batch-sizes 33 \
            --dtypes float32,bfloat16 $args --min-run-time 0.02 --rounds 1 --warmup 1 --threads 1 \
            --out "$WORK/bench-cpu.json" --no-plot
        return
    fi
    # FASTMLP_AUTOTUNE=1: the first call of each shape times the fused chain against the layer path
    # (cuBLAS); bench_mlp prints the decisions with both times (the heuristic's threshold to check)
    # shellcheck disable=SC2086
    FASTMLP_AUTOTUNE=1 "$PYTHON" -m bench.bench_mlp --device cuda --workloads 784-30-1,1000-100-10 \
        --batch-sizes 64,2048,12396,65536 \
        --dtypes float32,bfloat16 $args --min-run-time 0.1 --rounds 2 --warmup 3 \
        --out "$WORK/bench-cuda.json" --no-plot
}

model_step() {
    # Standard library only (no torch, no GPU): the same on the lent machine and in the dry run,
    # where the JSON is the CPU rehearsal's (the comparison then says its ratios mean nothing).
    local json="$WORK/bench-$DEVICE.json"
    if [[ ! -f "$json" ]]; then
        echo "skip: no bench JSON to compare (the bench step wrote none); the model's table instead"
        "$PYTHON" -m bench.perf_model
        return
    fi
    "$PYTHON" -m bench.perf_model --compare "$json"
}

bench_compile_step() {
    # One batch size: one compile per workload and dtype, no recompiles for new shapes.
    # (compile-autotune, max-autotune's GEMM search, is left out: minutes per graph.)
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "skip: dry run: torch.compile takes a minute on a CPU; the same command ran with eager alone"
        "$PYTHON" -m bench.bench_mlp --device cpu --workloads 20-8-1 --batch-sizes 16 --dtypes float32,bfloat16 \
            --phases fwdbwd --variants eager --min-run-time 0.02 --rounds 1 --warmup 1 --threads 1 \
            --out "$WORK/bench-compile-cpu.json" --no-plot
        return
    fi
    "$PYTHON" -m bench.bench_mlp --device cuda --workloads 784-30-1,1000-100-10 --batch-sizes 12396 \
        --dtypes float32,bfloat16 --phases fwdbwd --variants eager,compile --min-run-time 0.1 --rounds 2 \
        --warmup 3 --out "$WORK/bench-compile-cuda.json" --no-plot
}

ncu_step() {
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "skip: dry run: ncu needs a GPU; bench/ncu_case.py was run on the CPU"
        "$PYTHON" -m bench.ncu_case --device cpu --batch 70
        return
    fi
    local rep="$WORK/ncu-main-kernels"
    ncu --clock-control none --target-processes all --set detailed \
        --kernel-name regex:'.*(fused_step_kernel|fused_forward_kernel|gemm_kernel).*' --launch-count 5 \
        --export "$rep" --force-overwrite "$PYTHON" -m bench.ncu_case --device cuda --batch 2048
    ncu --import "$rep.ncu-rep" --page details --csv
}

export CORES
export -f env_step build_step info_step pytest_step sanitizer_step bench_args bench_step model_step bench_compile_step \
    ncu_step

# --- the run ---------------------------------------------------------------
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
TITLE="torch_fastmlp GPU check$([[ "$DRY_RUN" == 1 ]] && echo ' (dry run)'), commit $COMMIT, $(date '+%Y-%m-%d %H:%M:%S %Z'), $(uname -n)"
if [[ "$DRY_RUN" == 1 ]]; then DEVICE=cpu; else DEVICE=cuda; fi
export DEVICE
: >"$WORK/steps.tsv"
echo "$TITLE -> $DEST (total budget ${TOTAL}s, $CORES cores, MAX_JOBS=$MAX_JOBS)"
if ! command -v timeout >/dev/null 2>&1; then
    echo "error: coreutils 'timeout' is needed for the step budgets" >&2
    exit 2
fi

run_step env env_step
run_step build build_step
run_step info info_step
run_step pytest-cuda pytest_step
run_step bench bench_step
run_step model model_step
for tool in memcheck racecheck; do
    if [[ "$DRY_RUN" == 1 || -n "$(command -v compute-sanitizer)" ]]; then
        run_step "$tool" sanitizer_step "$tool"
    else
        skip_step "$tool" "compute-sanitizer not found"
    fi
done
run_step bench-compile bench_compile_step
if [[ "$DRY_RUN" == 1 || -n "$(command -v ncu)" ]]; then
    run_step ncu ncu_step
else
    skip_step ncu "ncu not found"
fi

refresh_out
echo
echo "=== summary: $TITLE"
echo "=== files in $DEST: $(cd "$DEST" && ls | tr '\n' ' ')($(($(find "$DEST" -type f | wc -l))) files, total $((SECONDS - T0))s)"
cat "$WORK/table.txt"
if [[ -s "$LOGS/left-out.log" ]]; then sed 's/^/left out: /' "$LOGS/left-out.log"; fi
if ! "$PYTHON" -m bench.gpu_check_report check-out "$DEST"; then
    echo "warning: $DEST breaks the lent machine's limits on what comes back (above)"
fi
failed=0
while IFS=$'\t' read -r name status _; do
    case "$name:$status" in
        *:ok | *:skipped | ncu:*) ;;
        *) failed=1 ;;
    esac
done <"$WORK/steps.tsv"
exit "$failed"
