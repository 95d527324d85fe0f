#!/usr/bin/env bash
# Static evidence for the GPU build: registers, shared memory and spills of every kernel in
# tricycle.cu, from `nvcc -Xptxas -v`, for each target architecture (default: sm_80 and sm_90), in
# the float build and the bfloat16 one, and the occupancy of the attention kernels computed from
# those registers and their shared memory by the hardware's rules (cudaOccupancy* needs a GPU).
# Nothing runs on a GPU. Usage: bench/kernel_report.sh [ARCH ...]
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
total_spills=0

# occupancy ARCH REGS SMEM_BYTES [WARPS]: resident warps per SM of a block of WARPS warps (default
# 8, the scalar attention kernels' launch shape: a warp per row, 8 rows; the tensor-core ones have
# 4), as "warps/64 (what limits it)". Both sm_80 and
# sm_90 give an SM 65536 registers, allocated 256 a warp, 64 warps and 32 blocks at most, and 1 KB
# of shared memory reserved per block; shared memory per SM is 164 KB on sm_80 and 228 KB on sm_90.
occupancy() {
    local arch=$1 regs=$2 smem=$3 warps_per_block=${4:-8}
    local shared=$((arch >= 90 ? 233472 : 167936))
    local warp_regs=$(((regs * 32 + 255) / 256 * 256))
    local by_regs=$((65536 / warp_regs / warps_per_block)) by_smem=$((shared / (smem + 1024)))
    local by_threads=$((64 / warps_per_block)) blocks limit
    blocks=$by_threads limit=threads
    [ "$by_regs" -lt "$blocks" ] && blocks=$by_regs limit=registers
    [ "$by_smem" -lt "$blocks" ] && blocks=$by_smem limit="shared memory"
    echo "$((blocks * warps_per_block))/64 warps ($limit)"
}

for precision in float bfloat16; do
    for arch in "${archs[@]}"; do
        log=$(mktemp)
        flag=$([ $precision = bfloat16 ] && echo -DTRICYCLE_BF16 || true)
        "$nvcc" -std=c++20 -O3 -ftz=true -x cu -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v \
            $flag -I. -c tricycle.cu -o /dev/null 2> "$log"
        echo "== sm_$arch, $precision: registers, shared memory (static bytes; dynamic is set at launch) and spills per kernel"
        printf "%-52s %5s %7s %12s\n" "kernel" "regs" "smem" "spill bytes"
        # ptxas prints, per kernel: "Compiling entry function 'NAME'", "... N bytes spill stores, M
        # bytes spill loads", "Used R registers, ... S bytes smem".
        rows=$(awk '
            /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
            /spill stores/ { spills = $5 + $9 }
            /Used [0-9]+ registers/ {
                regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
                smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
                print name, regs, smem, spills
            }' "$log")
        attention=""
        while read -r name regs smem spills; do
            pretty=$(echo "$name" | c++filt |
                sed 's/(KeyGrads)0/both/; s/(KeyGrads)1/values/; s/(KeyGrads)2/keys/; s/(.*//; s/^void //')
            printf "%-52s %5s %7s %12s\n" "${pretty:0:52}" "$regs" "$smem" "$spills"
            total_spills=$((total_spills + spills))
            # The flash kernels for heads of 64 (2 values a thread) and 128 (4): key and value (or
            # query and dout) tiles of 32 rows in float, 2 * 32 * hs * 4 bytes, dk/dv's 256 more.
            case $pretty in
                flash_attention_*_kernel\<2\> | flash_attention_*_kernel\<4\>)
                    per_thread=${pretty##*<}
                    per_thread=${per_thread%>}
                    dynamic=$((2 * 32 * 32 * per_thread * 4))
                    [[ $pretty == *dkdv* ]] && dynamic=$((dynamic + 256))
                    attention+=$(printf "%-44s %5s %7s  %s" "$pretty (hs $((32 * per_thread)))" "$regs" \
                        "$((smem + dynamic))" "$(occupancy "$arch" "$regs" "$((smem + dynamic))")")$'\n' ;;
                # The tensor-core kernels (4 warps): two stages of two tiles of 64 rows of hs + 8
                # bfloat16, dk/dv's lse and D (2 stages x 128 floats) more.
                tc_attention_*_kernel\<*)
                    hs=${pretty#*<}
                    hs=${hs%%[,>]*}
                    dynamic=$((4 * 64 * (hs + 8) * 2))
                    [[ $pretty == *dkdv* ]] && dynamic=$((dynamic + 1024))
                    attention+=$(printf "%-44s %5s %7s  %s" "$pretty" "$regs" "$((smem + dynamic))" \
                        "$(occupancy "$arch" "$regs" "$((smem + dynamic))" 4)")$'\n' ;;
                causal_softmax_*_kernel | attention_row_dot_kernel)
                    attention+=$(printf "%-44s %5s %7s  %s" "$pretty" "$regs" "$smem" \
                        "$(occupancy "$arch" "$regs" "$smem")")$'\n' ;;
            esac
        done <<< "$rows"
        echo "$(wc -l <<< "$rows") kernels compiled for sm_$arch, $precision"
        echo "-- occupancy of the attention kernels, sm_$arch, $precision (256 threads a block; tc_: 128)"
        printf "%-44s %5s %7s  %s\n" "kernel" "regs" "smem" "occupancy"
        printf "%s" "$attention"
        rm -f "$log"
    done
done
echo "total spill bytes over all kernels and architectures: $total_spills"
