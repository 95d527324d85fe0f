#!/usr/bin/env bash
# The bfloat16 build against the float build: the float binary writes its layer outputs and training
# losses, the bfloat16 binary computes the same and compares (see tests/mixed_precision.cu). Each runs
# checks of its own too. Then the bfloat16 binary checks the tensor-core flash attention against plain
# attention, with the emulator's launch shapes for the other kernels and again with the GPU's. The last
# line adds all summaries up.
set -u
reference=$(mktemp)
trap 'rm -f "$reference"' EXIT
passed=0 failed=0
for run in "./tests/mixed_precision_fp32 write $reference" "./tests/mixed_precision_bf16 compare $reference" \
    "./tests/mixed_precision_bf16 tensor-cores" "env TRICYCLE_LAUNCH_SHAPES=gpu ./tests/mixed_precision_bf16 tensor-cores"; do
    output=$($run 2>&1)
    status=$?
    echo "$output" | grep -vE '^[0-9]+ passed, [0-9]+ failed'
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' <<< "$output" | tail -n 1)
    if [ -z "$summary" ]; then
        echo "FAIL $run ended (exit status $status) before printing its summary"
        failed=$((failed + 1))
        continue
    fi
    read -r n_passed _ n_failed _ <<< "${summary//,/}"
    passed=$((passed + n_passed)) failed=$((failed + n_failed))
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
