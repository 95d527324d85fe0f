#!/usr/bin/env bash
# bench/gpu_first_run.sh — the first thing to run on a machine with an NVIDIA GPU, at most 10
# minutes in all (a budget of 540 s plus the last part's kill grace). Correctness before speed:
#   1. builds for that GPU's architecture alone, and the CPU build (the emulator) beside it;
#   2. trains one small GPT (2 layers, heads of 64, T=128, the same random batch, seed and
#      learning rate) for 10 steps on the GPU and under the emulator, in float and bfloat16, with
#      plain and flash attention, and compares the losses step by step (bench/compare_losses.sh:
#      the tolerance is twice what bfloat16 moves the emulator's own losses, an eighth of that for
#      the GPU's float build with its TF32 products);
#   3. runs compute-sanitizer's memcheck, racecheck, initcheck and synccheck over one training step
#      of that GPT with each attention path;
#   4. only then times bench_gpt (plain and flash) for GPT-2 124M (B=16, T=1024) and the
#      shakespeare preset (B=64, T=256) next to the cost model's predictions (bench_gpt
#      --estimate), with a per-kernel profile, and runs the test suite on the GPU.
# Everything goes into one report file, which ends with a VERDICT line (ok only when every loss
# comparison and every sanitizer run passed); the script prints the verdict and the report's path.
# Without a GPU (no nvidia-smi, or it lists none) it stops at once with a one-line error and exit
# status 1.
#
# Nothing can hang it: every part runs under `timeout`, and the report records each part's
# command, exit status, seconds and output. A part that would start after the overall budget is
# skipped (and reported so); a part's limit never reaches past the budget.
#
#   bash bench/gpu_first_run.sh
#   bash bench/gpu_first_run.sh --emulator-logs DIR
#                                 on any machine, GPU or not: builds the CPU programs and writes the
#                                 emulator's four loss runs into DIR, for a GPU machine that cannot
#                                 build the CPU programs (no oneDNN, OpenBLAS or Boost.Context)
#   GPU_FIRST_RUN_EMULATOR=DIR    take the emulator's runs from DIR instead of building them here
#   GPU_FIRST_RUN_OUT=DIR         where the report goes (default out/gpu_first_run); it is the only
#                                 file written there (each part's log goes to build/gpu_first_run)
#   GPU_FIRST_RUN_BUDGET=SECONDS  the overall budget (default 540)
#   GPU_FIRST_RUN_COMMIT=HASH     the commit to record when the copy has no git metadata
#   GPU_FIRST_RUN_DRY=1           print the plan, each part with its limit and command; run nothing
#   NVIDIA_SMI=PATH               the nvidia-smi to ask for the GPU (default: the one on PATH)
set -uo pipefail
cd "$(dirname "$0")/.."

out=${GPU_FIRST_RUN_OUT:-out/gpu_first_run}
budget=${GPU_FIRST_RUN_BUDGET:-540}
dry=${GPU_FIRST_RUN_DRY:-0}
report=$out/report.txt
work=build/gpu_first_run
started=$SECONDS
summary=()

# part NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less when the budget has less
# left), its output into $work/NAME.log and the report. Returns COMMAND's status (124: timed out).
part() {
    local name=$1 limit=$2
    shift 2
    if [ "$dry" = 1 ]; then
        printf '%-36s %4ss  %s\n' "$name" "$limit" "$*"
        return 0
    fi
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 15 ]; then
        summary+=("$(printf '%-36s %-12s %5s' "$name" skipped -)")
        printf '\n== %s: skipped, the budget of %ss is spent\n' "$name" "$budget" >> "$report"
        return 125
    fi
    [ "$limit" -le "$left" ] || limit=$left
    printf '\n== %s (limit %ss): %s\n' "$name" "$limit" "$*" >> "$report"
    local begin=$SECONDS status verdict
    timeout -k 10 "$limit" "$@" < /dev/null > "$work/$name.log" 2>&1
    status=$?
    cat "$work/$name.log" >> "$report"
    case $status in
        0) verdict=ok ;;
        124 | 137) verdict=timed-out ;;
        *) verdict="exit $status" ;;
    esac
    local took=$((SECONDS - begin))
    printf '== %s: %s after %ss\n' "$name" "$verdict" "$took" >> "$report"
    summary+=("$(printf '%-36s %-12s %5s' "$name" "$verdict" "$took")")
    echo "$name: $verdict (${took}s)"
    return $status
}

# safety NAME LIMIT COMMAND...: a part the verdict counts (a loss comparison, a sanitizer run).
safety_run=0
safety_failed=()
safety() {
    part "$@"
    local status=$?
    [ "$dry" = 1 ] || [ $status = 125 ] && return 0  # planned, or skipped for the budget
    safety_run=$((safety_run + 1))
    [ $status = 0 ] || safety_failed+=("$1")
}

# The small GPT of the loss comparison and the sanitizer runs: heads of 64, so that flash attention
# in bfloat16 is the tensor-core kernels. Ten steps at lr 3e-3 on one random batch, which the model
# learns (the loss falls by half), so that a wrong gradient shows in the losses too.
small=(--layers 2 --heads 2 --dim 128 --vocab 512 --context 128 --no-floor)
loss_run=("${small[@]}" --batch 4 --seq 128 --steps 10 --lr 3e-3)
one_step=("${small[@]}" --batch 1 --seq 64 --steps 1)

# The CPU build's bench_gpt in both precisions (MPI=0, as the GPU's), and its four loss runs.
emulator_make() { echo "make CPU=1 MPI=0 -j$(nproc) build/cpu/float/programs/bench_gpt build/cpu/bf16/programs/bench_gpt"; }
emulator_runs() {
    for precision in float bf16; do
        for attention in plain flash; do
            part "emulator-$precision-$attention" 60 build/cpu/$precision/programs/bench_gpt "${loss_run[@]}" --"$attention"
        done
    done
}

if [ "${1:-}" = --emulator-logs ]; then
    [ -n "${2:-}" ] || { echo "gpu_first_run: error: --emulator-logs needs a folder (DIR)" >&2; exit 2; }
    work=$2 report=$2/report.txt
    mkdir -p "$work" && : > "$report"
    part build-emulator 600 $(emulator_make) && emulator_runs
    status=$?
    echo "emulator logs: $work (GPU_FIRST_RUN_EMULATOR=$work bash bench/gpu_first_run.sh on the GPU machine)"
    exit $status
elif [ -n "${1:-}" ]; then
    echo "gpu_first_run: error: unknown argument '$1' (expected none, or --emulator-logs DIR)" >&2
    exit 2
fi

# The GPU's name, its architecture for nvcc (compute capability 9.0 -> 90) and the cost model's
# device for it.
smi=${NVIDIA_SMI:-nvidia-smi}
gpu_name=$(timeout 20 "$smi" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
arch=$(timeout 20 "$smi" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.')
case "$gpu_name" in
    *A100*) devices=a100 ;;
    *H100*) devices=h100 ;;
    *H200*) devices=h200 ;;
    *) devices="a100 h100 h200" ;;  # not a modelled GPU: every model, for comparison
esac
if [ "$dry" = 1 ]; then
    echo "plan (GPU: ${gpu_name:-none found}; architecture ${arch:-ARCH}; budget ${budget}s; report $report):"
    arch=${arch:-ARCH}
elif ! command -v "$smi" > /dev/null; then
    echo "gpu_first_run: error: no $smi (the NVIDIA driver's tool): this script needs a machine with an NVIDIA GPU (GPU_FIRST_RUN_DRY=1 prints the plan)" >&2
    exit 1
elif [ -z "$arch" ]; then
    echo "gpu_first_run: error: $smi lists no GPU: this script needs a machine with an NVIDIA GPU (GPU_FIRST_RUN_DRY=1 prints the plan)" >&2
    exit 1
else
    mkdir -p "$out" "$work"
    commit=${GPU_FIRST_RUN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
    {
        echo "gpu_first_run report, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "commit: $commit$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
        echo "GPU: $gpu_name, sm_$arch; cost model: $devices; budget ${budget}s"
    } > "$report"
fi

make_gpu=(make GPU=1 CUDA_ARCH="$arch")
gpu_bench=build/gpu/bf16/programs/bench_gpt  # (MPI=0: bench_gpt links no MPI)
emulator=${GPU_FIRST_RUN_EMULATOR:-$work}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
part machine 30 bash -c "$smi; $smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv; $nvcc --version | tail -n 2; nproc; free -g"
# The GPU programs (the tests' and both precisions' bench_gpt) and, at the same time, the CPU
# build's bench_gpt in both precisions (its log: build-emulator.log), unless its runs are given.
emulator_build="true"
[ -n "${GPU_FIRST_RUN_EMULATOR:-}" ] || emulator_build="$(emulator_make) > $work/build-emulator.log 2>&1"
part build 300 bash -c "($emulator_build) & emulator=\$!; ${make_gpu[*]} -j16 all bench/bench_gpt \
    && ${make_gpu[*]} MPI=0 -j16 build/gpu/float/programs/bench_gpt $gpu_bench; gpu=\$?; wait \$emulator; emulated=\$?; \
    cat $work/build-emulator.log 2> /dev/null | tail -n 5; echo \"GPU build: exit \$gpu; CPU build: exit \$emulated\"; [ \$gpu = 0 ] && [ \$emulated = 0 ]"

# Correctness first: the same training run on the GPU and under the emulator, loss by loss.
[ -n "${GPU_FIRST_RUN_EMULATOR:-}" ] || emulator_runs
for precision in float bf16; do
    for attention in plain flash; do
        part "gpu-$precision-$attention" 60 build/gpu/$precision/programs/bench_gpt "${loss_run[@]}" --"$attention"
    done
done
for precision in float bf16; do
    for attention in plain flash; do
        safety "compare-$precision-$attention" 15 bash bench/compare_losses.sh "$precision" \
            "$work/gpu-$precision-$attention.log" "$emulator/emulator-float-$attention.log" \
            "$emulator/emulator-bf16-$attention.log"
    done
done
sanitizer=$(command -v compute-sanitizer || echo "$(dirname "$nvcc")/compute-sanitizer")
if [ -x "$sanitizer" ] || [ "$dry" = 1 ]; then
    for tool in memcheck racecheck initcheck synccheck; do
        for attention in plain flash; do
            safety "sanitizer-$tool-$attention" 45 "$sanitizer" --tool "$tool" --error-exitcode 3 "$gpu_bench" "${one_step[@]}" --"$attention"
        done
    done
else
    printf '\n== sanitizers: not run, no compute-sanitizer on PATH or at %s\n' "$sanitizer" >> "$report"
    summary+=("$(printf '%-36s %-12s %5s' sanitizers "not found" -)")
fi

# Then speed: bench_gpt in bf16 against the cost model's predictions for the same shapes.
gpt2=(--batch 16 --seq 1024)
shakespeare=(--preset shakespeare --batch 64 --seq 256)
for attention in plain flash; do
    part "bench-gpt2-$attention" 90 "$gpu_bench" "${gpt2[@]}" --steps 5 --"$attention"
    part "bench-shakespeare-$attention" 60 "$gpu_bench" "${shakespeare[@]}" --steps 10 --"$attention"
done
# The estimates need no GPU; each prints its attention's table and the step with both kinds.
for attention in plain flash; do
    for device in $devices; do
        part "estimate-gpt2-$attention-$device" 20 "$gpu_bench" --estimate "$device" "${gpt2[@]}" --"$attention"
        part "estimate-shakespeare-$attention-$device" 20 "$gpu_bench" --estimate "$device" "${shakespeare[@]}" --"$attention"
    done
done
# Per-kernel times (CUDA events) against the cost model's table.
part profile-gpt2-flash 90 "$gpu_bench" "${gpt2[@]}" --steps 2 --flash --profile --no-floor
part profile-gpt2-plain 90 "$gpu_bench" "${gpt2[@]}" --steps 2 --plain --profile --no-floor

# The test suite, one program at a time (the list make test runs), each with its own limit. (Not
# with the variables of a make that may have started this script: `make test SANITIZE=1` puts
# SANITIZE=1 in the environment and in MAKEFLAGS.)
tests=$(env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    make -n GPU=1 SANITIZE= CPU= CUDA_ARCH="$arch" test 2>/dev/null | sed -e ':join' -e '/\\$/{N;s/\\\n//;b join' -e '}' |
    sed -n 's/.*tests\/run_tests.sh //p' | tail -n 1)
[ -n "$tests" ] || tests="(make -n test printed no list)"
for test in $tests; do
    part "test-$(basename "$test")" 150 bash tests/run_tests.sh "$test"
done

[ "$dry" = 1 ] && exit 0
# Measured against predicted: bench_gpt's RESULT lines and the estimates' ESTIMATE lines.
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" "$2" 2>/dev/null | tail -n 1; }
{
    echo
    echo "== measured (bf16 build) against the cost model"
    echo "(predicted: the cost model's adjusted step for that attention; flash kernels: the ones the"
    echo " model times for --flash, tensor_cores in bf16 at heads of 64 or 128, else scalar)"
    printf '%-12s %-6s %-6s %12s %12s %12s %10s %14s %12s %13s\n' shape attention model "measured ms" \
        "predicted ms" "roofline ms" "measured" "tokens/s pred." "memory GiB" "flash kernels"
    for shape in gpt2 shakespeare; do
        for attention in plain flash; do
            measured=$work/bench-$shape-$attention.log
            for device in $devices; do
                predicted=$work/estimate-$shape-$attention-$device.log
                printf '%-12s %-6s %-6s %12s %12s %12s %10s %14s %12s %13s\n' "$shape" "$attention" "$device" \
                    "$(field ms_per_step "$measured")" "$(field ms_per_step "$predicted")" \
                    "$(field roofline_ms "$predicted")" "$(field tokens_per_s "$measured")" \
                    "$(field tokens_per_s "$predicted")" "$(field peak_memory_gib "$measured")" \
                    "$(field flash_kernels "$predicted")"
            done
        done
    done
    echo
    echo "== parts"
    printf '%s\n' "${summary[@]}"
    echo "total: $((SECONDS - started))s of a ${budget}s budget"
} >> "$report"
if [ ${#safety_failed[@]} -gt 0 ]; then
    verdict="VERDICT: FAIL — ${#safety_failed[@]} of $safety_run loss comparisons and sanitizer runs failed: ${safety_failed[*]}"
elif [ "$safety_run" -lt 12 ]; then
    verdict="VERDICT: INCOMPLETE — only $safety_run of the 12 loss comparisons and sanitizer runs ran (the budget, or no compute-sanitizer), none failed"
else
    verdict="VERDICT: ok — the GPU's losses are the emulator's within tolerance (4 runs) and compute-sanitizer is clean (8 runs)"
fi
echo "$verdict" >> "$report"
echo "$verdict"
echo "report: $report"
[ ${#safety_failed[@]} -eq 0 ]
