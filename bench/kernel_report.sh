#!/usr/bin/env bash
# Static evidence for the GPU build: registers, shared memory and spills of every kernel in
# tricycle.cu, from `nvcc -Xptxas -v`, for each target architecture (default: sm_80 and sm_90), in
# the float build and the bfloat16 one. Nothing runs on a GPU. Usage: bench/kernel_report.sh [ARCH ...]
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
total_spills=0
for precision in float bfloat16; do
for arch in "${archs[@]}"; do
    log=$(mktemp)
    flag=$([ $precision = bfloat16 ] && echo -DTRICYCLE_BF16 || true)
    "$nvcc" -std=c++20 -O3 -ftz=true -x cu -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v $flag -I. -c tricycle.cu -o /dev/null 2> "$log"
    echo "== sm_$arch, $precision: registers, shared memory (static bytes; dynamic is set at launch) and spills per kernel"
    printf "%-52s %5s %7s %12s\n" "kernel" "regs" "smem" "spill bytes"
    # ptxas prints, per kernel: "Compiling entry function 'NAME'", "... N bytes spill stores, M bytes
    # spill loads", "Used R registers, ... S bytes smem".
    rows=$(awk '
        /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
        /spill stores/ { spills = $5 + $9 }
        /Used [0-9]+ registers/ {
            regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
            smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
            print name, regs, smem, spills
        }' "$log")
    while read -r name regs smem spills; do
        pretty=$(echo "$name" | c++filt | sed 's/(.*//')
        printf "%-52s %5s %7s %12s\n" "${pretty:0:52}" "$regs" "$smem" "$spills"
        total_spills=$((total_spills + spills))
    done <<< "$rows"
    echo "$(wc -l <<< "$rows") kernels compiled for sm_$arch, $precision"
    rm -f "$log"
done
done
echo "total spill bytes over all kernels and architectures: $total_spills"
