#!/usr/bin/env bash
# End-to-end checks of the programs: tokenizer -> train_gpt -> checkpoint -> inference, resuming,
# crashes while saving, corrupt files and bad flags. Small and fast: a debug-sized model, a few dozen
# steps, on a text made up here (6000 sentences from a tiny grammar, the same on every machine).
set -u
source "$(dirname "$0")/checks.sh"

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
awk 'BEGIN {
    split("cat dog bird fox horse mouse owl bear wolf deer", subject, " ")
    split("sees chases finds hears follows helps watches meets calls greets", verb, " ")
    split("river tree stone house field hill road bridge garden forest", object, " ")
    split("slowly quickly quietly loudly early late gladly rarely often twice", adverb, " ")
    x = 42  # a Lehmer generator: exact in awk arithmetic, so every machine makes the same text
    for (line = 0; line < 6000; line++) {
        x = (x * 16807) % 2147483647; s = subject[x % 10 + 1]
        x = (x * 16807) % 2147483647; v = verb[x % 10 + 1]
        x = (x * 16807) % 2147483647; o = object[x % 10 + 1]
        x = (x * 16807) % 2147483647; a = adverb[x % 10 + 1]
        print "the " s " " v " the " o " " a "."
    }
}' > "$dir/text.txt"
./tokenizer train --input "$dir/text.txt" --vocab-size 320 --output "$dir/tok.tok" 2>/dev/null
./tokenizer encode --tokenizer "$dir/tok.tok" --input "$dir/text.txt" --output "$dir/data" 2>/dev/null
check "tokenizer trains and encodes the text into token files" test -s "$dir/data_train.bin" -a -s "$dir/data_val.bin"

# Train a debug model; validation at steps 0, 20, 40, 60.
train=(./train_gpt --preset debug --train "$dir/data_train.bin" --val "$dir/data_val.bin" --tokenizer "$dir/tok.tok"
       --steps 60 --eval-interval 20 --eval-steps 4 --lr 1e-2 --warmup 5 --dropout 0.1)
"${train[@]}" --out "$dir/a" > "$dir/a.log" 2>&1
check "train_gpt runs 60 steps of the debug preset" grep -q "^done: 60 steps" "$dir/a.log"
first=$(grep -m1 "val loss" "$dir/a.log" | sed 's/.*val loss \([0-9.]*\).*/\1/')
last=$(grep "val loss" "$dir/a.log" | tail -n 1 | sed 's/.*val loss \([0-9.]*\).*/\1/')
check "validation loss falls clearly, by over 2 nats ($first -> $last; uniform is ln 320 = 5.77)" \
    awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 2) }'
check "checkpoints, metrics.csv (61 rows) and loss.svg are written" \
    bash -c "test -s '$dir/a/latest.bin' -a -s '$dir/a/best.bin' -a -s '$dir/a/loss.svg' && [ \$(wc -l < '$dir/a/metrics.csv') -eq 62 ]"
check "loss.svg is an SVG with both curves" bash -c "grep -q '<svg' '$dir/a/loss.svg' && [ \$(grep -c '<polyline' '$dir/a/loss.svg') -eq 2 ]"

# The console and metrics.csv count steps alike: "step 20/60 | loss X" is row 20's train loss.
console=$(grep -m1 "^step 20/60 | loss" "$dir/a.log" | sed 's/.*loss \([0-9.]*\).*/\1/')
csv=$(awk -F, '$1 == 20 { printf "%.4f", $2 }' "$dir/a/metrics.csv")
check "console step 20/60 and metrics.csv row 20 report the same loss ($console, $csv)" test -n "$console" -a "$console" = "$csv"
check "an evaluation is announced before it runs" grep -q "^step 20: evaluating (4 batches)" "$dir/a.log"
"${train[@]}" --out "$dir/accumulate" --steps 2 --grad-accum 4 > "$dir/accumulate.log" 2>&1
check "with 4 micro-batches per step, the first step reports micro-batches 1, 2 and 4" \
    bash -c "grep -c 'step 1/2: micro-batch [124]/4' '$dir/accumulate.log' | grep -qx 3"

./inference "$dir/a/latest.bin" --prompt "the fox " --tokens 40 --seed 1 > "$dir/sample.txt" 2>/dev/null
check "inference streams text from the checkpoint" test "$(wc -c < "$dir/sample.txt")" -gt 40
./inference "$dir/a/latest.bin" --prompt "the owl" --tokens 60 --temperature 0 --tokens-out "$dir/greedy_cache.txt" >/dev/null 2>&1
./inference "$dir/a/latest.bin" --prompt "the owl" --tokens 60 --temperature 0 --tokens-out "$dir/greedy_full.txt" --no-cache >/dev/null 2>&1
check "greedy generation: the KV cache gives the same 60 tokens as full recomputation" cmp "$dir/greedy_cache.txt" "$dir/greedy_full.txt"
./inference "$dir/a/latest.bin" --tokens 80 --top-k 20 --top-p 0.9 --seed 5 --tokens-out "$dir/sampled_cache.txt" >/dev/null 2>&1
./inference "$dir/a/latest.bin" --tokens 80 --top-k 20 --top-p 0.9 --seed 5 --tokens-out "$dir/sampled_full.txt" --no-cache >/dev/null 2>&1
check "sampled generation from an empty prompt: cached and uncached tokens identical" cmp "$dir/sampled_cache.txt" "$dir/sampled_full.txt"
./inference "$dir/a/latest.bin" --tokens 50 --temperature 0 --prompt "$(head -c 3000 "$dir/text.txt")" > /dev/null 2> "$dir/long.err"
check "a prompt longer than the context is cut from the left, with a notice" grep -q "keeping the last 32" "$dir/long.err"

# A run killed while saving its step-40 checkpoint (after the temporary file, before the rename)
# keeps the step-20 one; resuming from it ends exactly where the uninterrupted run did.
exec 3>&2 2>/dev/null  # keep bash's own "Aborted" report out of the test output
TRICYCLE_CRASH_BEFORE_RENAME=latest.bin:3 "${train[@]}" --out "$dir/b" > "$dir/b.log" 2>&1
exec 2>&3 3>&-
check "the crash hook killed the run while saving its third checkpoint" grep -q "aborting before renaming" "$dir/b.log"
check "after the crash, latest.bin is the intact step-20 checkpoint (inference loads it)" \
    ./inference "$dir/b/latest.bin" --tokens 5
check "the crash left its temporary checkpoint behind" compgen -G "$dir/b/latest.bin.tmp.*"
"${train[@]}" --out "$dir/b" --resume > "$dir/b2.log" 2>&1
check "resume continues from step 20" grep -q "resuming from .* at step 20" "$dir/b2.log"
check "resuming says the training flags are the command's (the checkpoint has the model's)" \
    grep -q "the training flags are this command's" "$dir/b2.log"
check "the resumed run removed the crashed run's temporary checkpoint" \
    bash -c "! compgen -G '$dir/b/latest.bin.tmp.*'"
check "a resumed run gives exactly the losses of the uninterrupted one (all 60 steps and 4 evaluations)" \
    cmp <(cut -d, -f1-5 "$dir/a/metrics.csv") <(cut -d, -f1-5 "$dir/b/metrics.csv")
"${train[@]}" --out "$dir/b" --steps 1 > "$dir/b3.log" 2>&1
check "a new run in a folder that holds one says it replaces it (the first run in a folder and a resumed one do not)" \
    bash -c "grep -q 'holds an earlier run' '$dir/b3.log' && ! grep -q 'holds an earlier run' '$dir/a.log' '$dir/b2.log'"

# Bad input.
head -c 5000 "$dir/a/latest.bin" > "$dir/truncated.bin"
fails_with "inference rejects a truncated checkpoint" "truncated" ./inference "$dir/truncated.bin"
printf 'not a model at all, just text that is long enough to hold a header' > "$dir/junk.bin"
fails_with "inference rejects a file that is not a checkpoint" "junk.bin" ./inference "$dir/junk.bin"
fails_with "inference rejects a missing checkpoint" "cannot open" ./inference "$dir/missing.bin"
fails_with "train_gpt rejects an unknown flag" "unknown flag '--learning-rate'" "${train[@]}" --out "$dir/c" --learning-rate 3
fails_with "train_gpt rejects a malformed number" "flag --steps expects an integer" "${train[@]}" --out "$dir/c" --steps ten
fails_with "inference rejects an unknown flag" "unknown flag '--temp'" ./inference "$dir/a/latest.bin" --temp 1
fails_with "tokenizer rejects an unknown flag" "unknown flag '--vocab'" ./tokenizer train --input "$dir/text.txt" --vocab 300 --output "$dir/x.tok"
./tokenizer train --bytes --output "$dir/bytes.tok" 2>/dev/null
fails_with "train_gpt calls token files of a bigger tokenizer another tokenizer's (before their range)" \
    "made with another tokenizer than '$dir/bytes.tok'" \
    ./train_gpt --preset debug --train "$dir/data_train.bin" --val "$dir/data_val.bin" --tokenizer "$dir/bytes.tok" --out "$dir/c"
fails_with "tokenizer decode likewise" "made with another tokenizer" \
    ./tokenizer decode --tokenizer "$dir/bytes.tok" --input "$dir/data_val.bin"
cp "$dir/data_val.bin" "$dir/unrecorded.bin"  # its tokenizer's fingerprint (header field 3) zeroed
printf '\0\0\0\0' | dd of="$dir/unrecorded.bin" bs=1 seek=12 conv=notrunc 2>/dev/null
fails_with "a token file that records no tokenizer, with tokens beyond the vocabulary, is refused" ">= vocab size 257" \
    ./tokenizer decode --tokenizer "$dir/bytes.tok" --input "$dir/unrecorded.bin"
fails_with "train_gpt rejects a --vocab-size that differs from the tokenizer" "does not match the tokenizer" "${train[@]}" --out "$dir/c" --vocab-size 500
fails_with "train_gpt refuses --init with --resume" "with --resume" "${train[@]}" --out "$dir/a" --resume --init "$dir/a/best.bin"
cp -r "$dir/a" "$dir/m"
sed -i '3s/^1,/nan,/' "$dir/m/metrics.csv"
fails_with "resuming with a corrupt metrics.csv names the file and line" "metrics.csv': line 3" "${train[@]}" --out "$dir/m" --steps 61 --resume
head -n 3000 "$dir/text.txt" | ./tokenizer train --input /dev/stdin --vocab-size 320 --output "$dir/other.tok" 2>/dev/null
fails_with "tokenizer decode refuses tokens another tokenizer made" "made with another tokenizer" ./tokenizer decode --tokenizer "$dir/other.tok" --input "$dir/data_val.bin"
fails_with "inference names a folder given as its model file" "is a folder" ./inference "$dir/a"
fails_with "inference reports a --tokens-out it could not write (a full disk)" "cannot write '/dev/full'" ./inference "$dir/a/latest.bin" --tokens 3 --tokens-out /dev/full
mkfifo "$dir/fifo"
fails_with "a pipe as a token file is refused, not waited on" "not a regular file" timeout 20 ./tokenizer decode --tokenizer "$dir/tok.tok" --input "$dir/fifo"
fails_with "a FIFO nobody writes to, as a model file, reads as empty, not waited on" "truncated" timeout 20 ./inference "$dir/fifo"
check "... and as a prompt file, an empty prompt" timeout 20 ./inference "$dir/a/latest.bin" --prompt-file "$dir/fifo" --tokens 2
fails_with "inference takes one prompt, whichever flag comes first" "not two" ./inference "$dir/a/latest.bin" --prompt-file "$dir/text.txt" --prompt hi
check "a prompt read from a pipe (/dev/stdin)" bash -c "echo ROMEO: | ./inference '$dir/a/latest.bin' --prompt-file /dev/stdin --tokens 2 | grep -q ROMEO:"
cp -r "$dir/a" "$dir/p" && rm "$dir/p/metrics.csv" && mkfifo "$dir/p/metrics.csv"
fails_with "a FIFO as metrics.csv is read as empty, not waited on" "metrics.csv': line 1" timeout 60 "${train[@]}" --out "$dir/p" --steps 61 --resume
cp "$dir/a/metrics.csv" "$dir/m/metrics.csv" && sed -i '3s/^1,/0x1,/' "$dir/m/metrics.csv"
fails_with "metrics.csv: a step in hex is not a row" "metrics.csv': line 3" "${train[@]}" --out "$dir/m" --steps 61 --resume
cp "$dir/a/metrics.csv" "$dir/m/metrics.csv" && sed -i '3{h;d};4G' "$dir/m/metrics.csv"
fails_with "metrics.csv: steps out of order" "step 1 after step 2, expected increasing steps" "${train[@]}" --out "$dir/m" --steps 61 --resume
fails_with "a diverging run (lr 1e4) stops at a non-finite loss, naming the step" "step" "${train[@]}" --out "$dir/d" --lr 1e4 --clip 0 --min-lr 0
check "after the divergence the last good checkpoint still loads" ./inference "$dir/d/latest.bin" --tokens 3
# make: the corpus comes from DATA= for any target; tokenizer and token files are named by VOCAB.
mkdir -p "$dir/make"
make -s -C "$dir/make" -f "$PWD/Makefile" data/tinyshakespeare.txt DATA="$dir/text.txt" > "$dir/make.log" 2>&1
check "make data/tinyshakespeare.txt DATA=FILE copies the corpus from FILE" cmp "$dir/text.txt" "$dir/make/data/tinyshakespeare.txt"
mkdir -p "$dir/make2"
fails_with "make with DATA= naming a missing file says so" "DATA=$dir/none.txt: no such file" \
    make -s -C "$dir/make2" -f "$PWD/Makefile" data/tinyshakespeare.txt DATA="$dir/none.txt"
# (-B: the recipe is printed even where an earlier `make train VOCAB=512` made the files)
check "make train VOCAB=512 makes data/shakespeare_512.tok, not the 1024-token one" \
    bash -c "make -n -B train VOCAB=512 CPU=1 2>/dev/null | grep -q 'vocab-size 512 --output data/shakespeare_512.tok'"
# make's choice of precision for CPUs of each class (CPU_FLAGS stands in for /proc/cpuinfo's flags).
picks() {  # picks PRECISION make-arguments...: `make config` with those arguments says PRECISION
    local expected=$1
    shift  # (not the variables of a calling make, e.g. make test BF16=0 or SANITIZE=1, which make
    # passes on in MAKEFLAGS and in the environment)
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL -u BF16 -u CPU_FLAGS -u SANITIZE -u GPU -u CPU -u MPI \
        make -s config "$@" 2>/dev/null |
        grep -q "precision $expected ("
}
check "make picks float for an AVX2-only CPU" picks float CPU=1 CPU_FLAGS="fpu sse2 avx avx2 fma"
check "make picks bf16 for a CPU with AVX512-BF16" picks bf16 CPU=1 CPU_FLAGS="avx2 avx512f avx512_bf16"
check "make picks bf16 for a CPU with AMX-BF16" picks bf16 CPU=1 CPU_FLAGS="avx2 avx512f amx_tile amx_bf16"
check "make picks float on a bfloat16 CPU when given BF16=0" picks float CPU=1 CPU_FLAGS="avx512_bf16" BF16=0
check "make picks float for the GPU build" picks float GPU=1 CPU_FLAGS="amx_bf16"
# bench_gpt: a step of the debug preset with the memory it holds, and the cost model's estimates.
./bench/bench_gpt --preset debug --batch 2 --seq 32 --steps 1 > "$dir/bench.log" 2>&1
check "bench_gpt times a step and reports the memory a step holds" \
    bash -c "grep -q '^memory held by a step' '$dir/bench.log' && grep -q 'peak_memory_gib=' '$dir/bench.log'"
# Its product floor replays exactly the step's products: per layer 4 linear layers of 3 products
# each (forward, input and weight gradients) and attention's 2 forward and 4 backward batched ones,
# plus the tied lm head's 3 (the debug preset: 2 layers, so 39). The RESULT line's ratios are those
# of its own figures.
bench_field() { sed -n "s/^RESULT .* $1=\([^ ]*\).*/\1/p" "$dir/bench.log"; }
check "bench_gpt's product floor runs the step's 39 products again" \
    grep -q "^product floor: the step's 39 matrix products alone take" "$dir/bench.log"
check "bench_gpt reports a product peak and floor, and the step over each ($(bench_field peak_gflops) GFLOPS, $(bench_field floor_ms) ms)" \
    awk -v peak="$(bench_field peak_gflops)" -v share="$(bench_field peak_share)" -v floor="$(bench_field floor_ms)" \
        -v ratio="$(bench_field floor_ratio)" -v ms="$(bench_field ms_per_step)" -v tflops="$(bench_field model_tflops)" \
        'function near(a, b) { return a - b < 0.02 * b + 0.01 && b - a < 0.02 * b + 0.01 }
         BEGIN { exit !(peak > 0 && floor > 0 && near(ratio, ms / floor) && near(share, tflops * 1000 / peak)) }'
estimate() {  # prints a field of the ESTIMATE line of an A100 estimate
    local field=$1
    shift
    ./bench/bench_gpt --estimate a100 "$@" | sed -n "s/^ESTIMATE .* $field=\([^ %]*\).*/\1/p"
}
plain_tflop=$(estimate tensor_tflop --plain)
# Plain attention runs every product in full: 6 FLOPs per weight of the matrices (the lm head's on
# the padded vocabulary, 50304) and 12 L T C per position, for GPT-2 124M with B=16, T=1024.
expected=$(awk 'BEGIN { L = 12; C = 768; T = 1024; N = 16 * T
                        printf "%.4f", N * (6 * (12 * L * C * C + 50304 * C) + 12 * L * T * C) / 1e12 }')
check "the cost model's products (plain attention) do 6 FLOPs per weight and 12 L T C per position ($plain_tflop, $expected TFLOP)" \
    awk -v a="${plain_tflop:-0}" -v b="$expected" 'BEGIN { exit !(a - b < 1e-3 && b - a < 1e-3) }'
# bf16, heads of 64: flash is the tensor-core kernels, whose products compute per head and layer
# the tiles below the diagonal and 10 of the diagonal tile's 16 chunks of 16 x 16 (pairs), 2 + 3
# + 4 products of 2 hs FLOPs per pair (forward, dq, dk/dv), beside the products outside attention.
flash_tflop=$(estimate tensor_tflop --flash)
expected=$(awk 'BEGIN { L = 12; C = 768; T = 1024; N = 16 * T; heads = 16 * 12; hs = 64
                        for (b = 0; b < T / 64; b++) pairs += b * 64 * 64 + 16 * 16 * 10
                        products = N * 6 * (12 * L * C * C + 50304 * C)
                        printf "%.4f", (products + L * heads * pairs * 18 * hs) / 1e12 }')
check "the cost model's tensor-core flash skips the masked tiles and chunks ($flash_tflop, $expected TFLOP)" \
    awk -v a="${flash_tflop:-0}" -v b="$expected" 'BEGIN { exit !(a - b < 1e-3 && b - a < 1e-3) }'
read -r plain_ms flash_ms kernels <<< "$(estimate plain_ms) $(estimate flash_ms) $(estimate flash_kernels)"
check "the cost model's bf16 flash for GPT-2 124M is the tensor-core kernels, faster than plain ($kernels: $flash_ms < $plain_ms ms)" \
    awk -v k="$kernels" -v a="${flash_ms:-0}" -v b="${plain_ms:-0}" 'BEGIN { exit !(k == "tensor_cores" && a > 0 && a < b) }'
# The float build's step: the same products in TF32 (half the bf16 peak) and twice the bytes; its
# flash is the scalar kernels (~30-50 warp instructions per (query, key) pair on the CUDA cores).
read -r float_ms float_flash_ms float_kernels <<< \
    "$(estimate ms_per_step --precision float) $(estimate flash_ms --precision float) $(estimate flash_kernels --precision float)"
check "the cost model's float (TF32) step is slower than its bf16 one ($float_ms > $plain_ms ms)" \
    awk -v a="${float_ms:-0}" -v b="${plain_ms:-0}" 'BEGIN { exit !(b > 0 && a > b) }'
check "the cost model's float flash is the scalar kernels, slower than plain ($float_kernels: $float_flash_ms > $float_ms ms)" \
    awk -v k="$float_kernels" -v a="${float_flash_ms:-0}" -v b="${float_ms:-0}" 'BEGIN { exit !(k == "scalar" && b > 0 && a > b) }'
# bf16: the linear biases ride in the products' epilogues (no bias copies, no bias + GELU pass, no
# column sums; the norms' backward sums dw and db in its own pass); the float build keeps those
# passes.
./bench/bench_gpt --estimate a100 > "$dir/estimate_bf16.log"
./bench/bench_gpt --estimate a100 --precision float > "$dir/estimate_float.log"
# Rows of those passes: bias copies, bias + GELU, the bias column sums' first stage.
passes() { grep -cE 'bias into rows|bias \+ GELU +[0-9]|db \(partial sums\)' "$1"; }
read -r bf16_passes float_passes <<< "$(passes "$dir/estimate_bf16.log") $(passes "$dir/estimate_float.log")"
check "the cost model's bf16 step has no bias copies, bias + GELU or column sums (0 rows: $bf16_passes), the float step 3 bias copies, bias + GELU and 4 bias column sums (8: $float_passes)" \
    test "$bf16_passes,$float_passes" = "0,8"
fails_with "bench_gpt has no --fa2 any more (flash is the tensor-core kernels in bf16)" "unknown flag '--fa2'" \
    ./bench/bench_gpt --estimate a100 --fa2
fails_with "bench_gpt --precision names the two it knows" "expected bf16 or float" \
    ./bench/bench_gpt --estimate a100 --precision fp8
fails_with "bench_gpt --estimate names the devices it knows" "expected a100, h100 or h200" ./bench/bench_gpt --estimate tpu
# bench/gpu_first_run.sh: parses, refuses in one line without a GPU, and plans every part.
check "bench/gpu_first_run.sh parses (bash -n)" bash -n bench/gpu_first_run.sh
fails_with "gpu_first_run.sh without nvidia-smi says it needs a GPU" \
    "gpu_first_run: error: no $dir/no-nvidia-smi (the NVIDIA driver's tool): this script needs a machine with an NVIDIA GPU" \
    env NVIDIA_SMI="$dir/no-nvidia-smi" GPU_FIRST_RUN_OUT="$dir/first_run" bash bench/gpu_first_run.sh
check "gpu_first_run.sh without a GPU writes no report" test ! -e "$dir/first_run"
GPU_FIRST_RUN_DRY=1 NVIDIA_SMI="$dir/no-nvidia-smi" bash bench/gpu_first_run.sh > "$dir/plan.txt" 2>&1
check "gpu_first_run.sh's plan: the builds, 4 loss comparisons, 4 sanitizer tools x 2 attentions, then the benches, estimates and tests" \
    bash -c "grep -q '^build ' '$dir/plan.txt' && grep -q '^bench-gpt2-flash ' '$dir/plan.txt' &&
             grep -q '^estimate-shakespeare-plain-a100 ' '$dir/plan.txt' &&
             [ \$(grep -cE '^compare-(float|bf16)-(plain|flash) ' '$dir/plan.txt') = 4 ] &&
             [ \$(grep -cE '^sanitizer-(memcheck|racecheck|initcheck|synccheck)-(plain|flash) ' '$dir/plan.txt') = 8 ] &&
             [ \$(grep -n '^compare-bf16-flash ' '$dir/plan.txt' | cut -d: -f1) -lt \$(grep -n '^bench-gpt2-plain ' '$dir/plan.txt' | cut -d: -f1) ] &&
             grep -q '^test-test_gradients ' '$dir/plan.txt'"
fails_with "gpu_first_run.sh refuses an unknown argument" "unknown argument '--fast'" bash bench/gpu_first_run.sh --fast

# bench/compare_losses.sh judges the GPU's losses by the emulator's. Here it judges the emulator's
# own: the same small GPT trained in float and bf16 with plain and flash attention.
loss_run=(--layers 2 --heads 2 --dim 128 --vocab 512 --context 128 --no-floor --batch 4 --seq 128 --steps 10 --lr 3e-3)
for precision in float bf16; do
    programs=$TRICYCLE_PROGRAMS_FLOAT
    [ "$precision" = bf16 ] && programs=$TRICYCLE_PROGRAMS_BF16
    for attention in plain flash; do
        "$programs/bench_gpt" "${loss_run[@]}" --"$attention" > "$dir/loss-$precision-$attention.log" 2>&1
    done
done
compare() { bash bench/compare_losses.sh "$1" "$dir/$2.log" "$dir/loss-float-plain.log" "$dir/loss-bf16-plain.log"; }
check "compare_losses: bf16 flash attention trains as bf16 plain attention does, within the bf16 tolerance" compare bf16 loss-bf16-flash
check "compare_losses: float flash attention trains as float plain attention does, within the TF32 tolerance" compare float loss-float-flash
check "compare_losses: the emulator's runs train (the loss halves in 10 steps)" \
    bash -c "bash bench/compare_losses.sh bf16 '$dir/loss-bf16-plain.log' '$dir/loss-float-plain.log' '$dir/loss-bf16-plain.log' | grep -q 'emulator_trains=yes'"
fails_with "compare_losses: bf16 losses are not float losses within the TF32 tolerance" "COMPARE FAIL precision=float" \
    compare float loss-bf16-plain
sed 's/^step 4: loss [0-9.]*/step 4: loss nan/' "$dir/loss-bf16-flash.log" > "$dir/loss-nan.log"
fails_with "compare_losses: a NaN loss fails, naming its step" "step 4 has loss nan" compare bf16 loss-nan
head -n 5 "$dir/loss-bf16-flash.log" > "$dir/loss-short.log"
fails_with "compare_losses: a run cut short fails" "step counts differ" compare bf16 loss-short
for program in train_gpt inference tokenizer bench/bench_gpt; do
    check "$program --help" "./$program" --help
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
