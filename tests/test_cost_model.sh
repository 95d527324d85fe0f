#!/usr/bin/env bash
# Checks of the GPU cost model (bench/bench_gpt --estimate, bench/cost_model.cu): its calibration
# against llm.c's published throughput, the range of its assumed efficiencies, and structural facts
# of the two steps it models. Needs no GPU: run from the repository root after building
# ./bench/bench_gpt.
set -u
source "$(dirname "$0")/checks.sh"
field() {  # field KEY LINE: the value of KEY=value in a line of key=value pairs, a trailing % cut
    tr ' ' '\n' <<< "$2" | sed -n "s/^$1=//p" | tr -d '%'
}

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
./bench/bench_gpt --estimate a100 --llmc > "$dir/llmc.log" 2>&1
calibration=$(grep '^CALIBRATION ' "$dir/llmc.log")
ratio=$(field ratio "$calibration")
check "--estimate a100 --llmc prints a CALIBRATION line" test -n "$calibration"
# The published figure: 65,536 tokens a GPU in ~300 ms (llm.c's scripts/run_gpt2_124M.sh).
check "the published figure is llm.c's 64 x 1024 tokens in 300 ms per A100 ($(field published_tokens_per_s "$calibration"))" \
    test "$(field published_tokens_per_s "$calibration")" = 218453
check "the model reproduces llm.c's published tokens/s within 15% (ratio $ratio)" \
    awk -v r="$ratio" 'BEGIN { exit !(r >= 0.85 && r <= 1.15) }'
# Off the published run's shape there is nothing to compare with, and the model says so.
./bench/bench_gpt --estimate a100 --llmc --batch 16 > "$dir/llmc16.log" 2>&1
check "at B=16 (not the published run) --llmc prints no CALIBRATION line, and says why" \
    bash -c "! grep -q '^CALIBRATION ' '$dir/llmc16.log' && grep -q '^no CALIBRATION' '$dir/llmc16.log'"
./bench/bench_gpt --estimate h100 --llmc > "$dir/llmc_h100.log" 2>&1
check "on an h100 (the figure is an A100's) --llmc prints no CALIBRATION line" \
    bash -c "! grep -q '^CALIBRATION ' '$dir/llmc_h100.log' && grep -q '^COMPARE ' '$dir/llmc_h100.log'"

# Every efficiency of every device is a fraction of a peak: in (0, 1].
for device in a100 h100 h200; do
    line=$(./bench/bench_gpt --estimate "$device" 2>&1 | grep '^EFFICIENCIES ')
    check "$device: every assumed efficiency is in (0, 1] ($line)" \
        awk -v l="$line" 'BEGIN { n = split(l, kv, " "); seen = 0
            for (i = 2; i <= n; i++) { split(kv[i], p, "="); if (p[1] == "device" || p[1] == "launch_us") continue
                seen++; v = p[2] + 0; if (!(v > 0 && v <= 1)) exit 1 }
            exit seen != 4 }'
done

# Structure: llm.c's memory-bound kernels move fewer bytes, in far fewer launches, than our
# default (plain attention: the (T, T) scores written and softmaxed). With flash attention ours move
# fewer than llm.c's: GELU and the bias gradients ride in our cuBLASLt epilogues, while llm.c runs
# GELU forward and backward and the bias sums as kernels of their own (its gelu_fusion 0 default).
compare=$(grep '^COMPARE ' "$dir/llmc.log")
llmc_gb=$(field llmc_kernel_gb "$compare")
check "llm.c's kernels move fewer bytes than our plain step's ($llmc_gb vs $(field ours_plain_kernel_gb "$compare") GB)" \
    awk -v a="$llmc_gb" -v b="$(field ours_plain_kernel_gb "$compare")" 'BEGIN { exit !(a < b) }'
check "llm.c's step has under a tenth of our plain step's launches ($(field llmc_launches "$compare") vs $(field ours_plain_launches "$compare"))" \
    awk -v a="$(field llmc_launches "$compare")" -v b="$(field ours_plain_launches "$compare")" 'BEGIN { exit !(10 * a < b) }'
check "our flash step's kernels move fewer bytes than llm.c's ($(field ours_flash_kernel_gb "$compare") vs $llmc_gb GB)" \
    awk -v a="$(field ours_flash_kernel_gb "$compare")" -v b="$llmc_gb" 'BEGIN { exit !(a < b) }'
check "llm.c's step has no plain-attention softmax and runs cuDNN attention both ways" \
    bash -c "sed -n '1,/^COMPARE/p' '$dir/llmc.log' | grep -q 'cuDNN attention backward' &&
             ! sed -n '1,/^COMPARE/p' '$dir/llmc.log' | grep -q 'causal softmax'"

# Ours, at the default B=16 T=1024: the tensor-core flash step is faster than the plain one, and
# within 10% of llm.c's modelled step at the same shape (the same efficiencies, the same products,
# kernels of its class: a row lost or counted twice would show).
plain=$(./bench/bench_gpt --estimate a100 --plain 2>&1 | grep '^ESTIMATE ')
flash=$(./bench/bench_gpt --estimate a100 --flash 2>&1 | grep '^ESTIMATE ')
# Without --flash or --plain the estimate is of the GPU build's default: flash in bf16 at heads of
# 64 (GPT-2's), plain in the float build.
default=$(./bench/bench_gpt --estimate a100 2>&1 | grep '^ESTIMATE ')
default_float=$(./bench/bench_gpt --estimate a100 --precision float 2>&1 | grep '^ESTIMATE ')
plain_float=$(./bench/bench_gpt --estimate a100 --precision float --plain 2>&1 | grep '^ESTIMATE ')
check "a100 bf16: the default kernels are the tensor-core flash ones ($(field tokens_per_s "$default") vs $(field tokens_per_s "$flash") tokens/s)" \
    test "$(field tokens_per_s "$default")" = "$(field tokens_per_s "$flash")" -a -n "$flash"
check "a100 float: the default kernels are the plain ones ($(field tokens_per_s "$default_float") vs $(field tokens_per_s "$plain_float") tokens/s)" \
    test "$(field tokens_per_s "$default_float")" = "$(field tokens_per_s "$plain_float")" -a -n "$plain_float"
check "a100: flash beats plain ($(field tokens_per_s "$flash") vs $(field tokens_per_s "$plain") tokens/s)" \
    awk -v f="$(field tokens_per_s "$flash")" -v p="$(field tokens_per_s "$plain")" 'BEGIN { exit !(f > p) }'
llmc16=$(sed -n 's/^llm.c modelled: .* ms\/step, \([0-9]*\) tokens\/s.*/\1/p' "$dir/llmc16.log")
check "a100 B=16: our flash step is within 10% of llm.c's modelled step ($(field tokens_per_s "$flash") vs $llmc16 tokens/s)" \
    awk -v l="$llmc16" -v f="$(field tokens_per_s "$flash")" 'BEGIN { exit !(f > 0.9 * l && f < 1.1 * l) }'
check "--llmc without --estimate fails, naming --estimate" \
    bash -c "out=\$(./bench/bench_gpt --llmc 2>&1); [ \$? -ne 0 ] && grep -q 'needs --estimate' <<< \"\$out\""

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
