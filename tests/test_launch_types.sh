#!/usr/bin/env bash
# launch() checks its arguments against the kernel's parameters at compile time, in the emulator's
# build (g++) and in the GPU build (nvcc, when installed): a correct launch compiles; a real* passed
# where the kernel takes floatX* (bfloat16 build), or a missing argument, does not.
set -u
passed=0 failed=0 skipped=0
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kernel='#include "tricycle.h"
__global__ void takes_storage(floatX* out, long n) { (void)out, (void)n; }'
printf '%s\nvoid right(floatX* x) { launch(takes_storage, 1, 1, 0, x, 3); }\n' "$kernel" > "$dir/right.cu"
printf '%s\nvoid wrong(real* x) { launch(takes_storage, 1, 1, 0, x, 3); }\n' "$kernel" > "$dir/wrong_type.cu"
printf '%s\nvoid wrong(floatX* x) { launch(takes_storage, 1, 1, 0, x); }\n' "$kernel" > "$dir/wrong_count.cu"

expect() {  # expect NAME COMPILER-COMMAND FILE MESSAGE: MESSAGE empty means it must compile
    local name=$1 compiler=$2 file=$3 message=$4 output status
    output=$($compiler "$dir/$file" 2>&1)
    status=$?
    if [ -z "$message" ] && [ $status -eq 0 ]; then
        echo "ok   $name"; passed=$((passed + 1))
    elif [ -n "$message" ] && [ $status -ne 0 ] && grep -qF "$message" <<< "$output"; then
        echo "ok   $name: rejected with \"$message\""; passed=$((passed + 1))
    else
        echo "FAIL $name: exit $status: $(grep -m1 error <<< "$output")"; failed=$((failed + 1))
    fi
}

gxx="${CXX:-g++} -std=c++20 -fsyntax-only -DTRICYCLE_BF16 -I. -x c++"
nvcc_path=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
compilers=("g++ (emulator)|$gxx")
if [ -x "$nvcc_path" ]; then
    compilers+=("nvcc (GPU)|$nvcc_path -std=c++20 -DTRICYCLE_BF16 -I. -x cu -c -o /dev/null")
else
    echo "skip nvcc is not installed: the GPU build's launch checks were not compiled"; skipped=$((skipped + 3))
fi
for entry in "${compilers[@]}"; do
    name=${entry%%|*} compiler=${entry#*|}
    expect "$name, bfloat16 build: a launch whose arguments fit compiles" "$compiler" right.cu ""
    expect "$name, bfloat16 build: a real* where the kernel takes floatX*" "$compiler" wrong_type.cu \
        "does not convert implicitly to the kernel's parameter type"
    expect "$name, bfloat16 build: one argument too few" "$compiler" wrong_count.cu "takes a different number of arguments"
done
if [ $skipped -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"; else echo "$passed passed, $failed failed"; fi
[ $failed -eq 0 ]
