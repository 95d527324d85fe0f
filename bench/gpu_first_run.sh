#!/usr/bin/env bash
# bench/gpu_first_run.sh — the first thing to run on a machine with an NVIDIA GPU, at most 10
# minutes in all (a budget of 540 s plus the last part's kill grace). It builds for that GPU's
# architecture alone, times bench_gpt (plain and flash attention) for GPT-2 124M (B=16, T=1024)
# and the shakespeare preset (B=64, T=256) next to the cost model's predictions for the same shapes
# (bench_gpt --estimate), runs compute-sanitizer's memcheck, racecheck and initcheck over one step
# of a tiny GPT, then the test suite on the GPU, and writes everything into one report file, whose
# path it prints at the end. Without a GPU (no nvidia-smi, or it lists none) it stops at once with
# a one-line error and exit status 1.
#
# Nothing can hang it: every part runs under `timeout`, and the report records each part's
# command, exit status, seconds and output. A part that would start after the overall budget is
# skipped (and reported so); a part's limit never reaches past the budget.
#
#   bash bench/gpu_first_run.sh
#   GPU_FIRST_RUN_OUT=DIR         where the report goes (default out/gpu_first_run); it is the only
#                                 file written there (each part's log and the bf16 bench_gpt go to
#                                 build/gpu_first_run)
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
bench_bf16=$work/bench_gpt_bf16
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
part machine 30 bash -c "$smi; $smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv; $nvcc --version | tail -n 2; nproc; free -g"
# Every object in one parallel make (the bf16 bench's too), then the bf16 bench_gpt linked and set
# aside (the cost model is of bf16 storage), then the float programs linked back for the tests.
part build 300 bash -c "${make_gpu[*]} -j16 all bench/bench_gpt build/gpu/bf16/bench/bench_gpt.o build/gpu/bf16/bench/cost_model.o \
    && ${make_gpu[*]} BF16=1 bench/bench_gpt && cp bench/bench_gpt $bench_bf16 && ${make_gpu[*]} -j16 all bench/bench_gpt"

gpt2=(--batch 16 --seq 1024)
shakespeare=(--preset shakespeare --batch 64 --seq 256)
for attention in plain flash; do
    part "bench-gpt2-$attention" 90 "$bench_bf16" "${gpt2[@]}" --steps 5 --"$attention"
    part "bench-shakespeare-$attention" 60 "$bench_bf16" "${shakespeare[@]}" --steps 10 --"$attention"
done
# The estimates need no GPU; each prints its attention's table and the step with both kinds.
for attention in plain flash; do
    for device in $devices; do
        part "estimate-gpt2-$attention-$device" 20 "$bench_bf16" --estimate "$device" "${gpt2[@]}" --"$attention"
        part "estimate-shakespeare-$attention-$device" 20 "$bench_bf16" --estimate "$device" "${shakespeare[@]}" --"$attention"
    done
done
# Per-kernel times (CUDA events) against the cost model's table.
part profile-gpt2-flash 90 "$bench_bf16" "${gpt2[@]}" --steps 2 --flash --profile
part profile-gpt2-plain 90 "$bench_bf16" "${gpt2[@]}" --steps 2 --plain --profile

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
tiny=(--preset debug --batch 2 --seq 32 --steps 1)
for tool in memcheck racecheck initcheck; do
    for attention in plain flash; do
        part "sanitizer-$tool-$attention" 60 "$sanitizer" --tool "$tool" --error-exitcode 3 "$bench_bf16" "${tiny[@]}" --"$attention"
    done
done

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
echo "report: $report"
