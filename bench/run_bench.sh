#!/usr/bin/env bash
# make bench: Tricycle against PyTorch on nanoGPT's CPU recipe, side by side in one invocation, then
# where Tricycle's time goes (per kernel), the recipe's and the GPT-2 124M shape's steps against
# their product floor and the product peak in both precisions, and the kernels' register report.
#
# The recipe: character-level tinyshakespeare (first 90% train, last 10% val), 4 layers, 4 heads,
# 128 dim, context 64, batch 12, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4,
# beta2 0.99, weight decay 0.1, clip 1.0, dropout 0, eval every 250 steps on 20 batches, fp32.
# BENCH_STEPS=N shortens it (default 2000); BENCH_SKIP_PYTORCH=1 leaves PyTorch out.
# With BUILD=gpu (make bench on a GPU) it measures the GPU instead: tokens/s, MFU and the per-kernel
# breakdown (CUDA events) for the GPT-2 124M shape and the shakespeare preset.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${BUILD:-cpu}" == gpu* ]]; then
    nvidia-smi -L
    echo "== GPT-2 124M shape (12 layers, 768 dim, 12 heads, vocab 50257), B=8, T=1024"
    ./bench/bench_gpt --batch 8 --seq 1024 --steps 10 --profile | grep -v '^step'
    echo
    echo "== the shakespeare preset (6 layers, 384 dim, 6 heads, vocab 1024), B=64, T=256"
    ./bench/bench_gpt --layers 6 --heads 6 --dim 384 --vocab 1024 --context 256 --batch 64 --seq 256 --steps 20 --profile | grep -v '^step'
    echo
    bash bench/kernel_report.sh | grep -E "kernels compiled|total spill"
    exit 0
fi
steps=${BENCH_STEPS:-2000}
data=${DATA:-data/tinyshakespeare.txt}
out=out/bench
mkdir -p data "$out"

# Character-level data: the byte tokenizer (256 bytes + end-of-text, vocab 257).
[ -f data/bytes.tok ] || ./tokenizer train --bytes --output data/bytes.tok
[ -f data/char_train.bin ] || ./tokenizer encode --tokenizer data/bytes.tok --input "$data" --output data/char
recipe=(--layers 4 --heads 4 --dim 128 --context 64 --batch 12 --steps "$steps" --lr 1e-3 --min-lr 1e-4 --warmup 100
        --beta2 0.99 --weight-decay 0.1 --clip 1.0 --dropout 0 --eval-interval 250 --eval-steps 20 --seed 1337)

median_ms() {  # median step time of a metrics.csv (from its tokens/s column), in ms
    awk -F, -v tokens=$((12 * 64)) 'NR > 1 && $6 != "" { print tokens / $6 * 1000 }' "$1" | sort -n |
        awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

echo "== this CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores;" \
     "matrix features: $(grep -m1 -owE 'amx_bf16|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "== nanoGPT CPU recipe, $steps steps"
calc() { awk "BEGIN { print $1 }"; }
start=$(date +%s.%N)
./train_gpt --train data/char_train.bin --val data/char_val.bin --tokenizer data/bytes.tok --out "$out" "${recipe[@]}" > "$out/train.log"
ours_wall=$(calc "$(date +%s.%N) - $start")
ours_build="${BUILD:-cpu} build, $(grep -m1 '^matrix products:' "$out/train.log" | sed 's/^matrix products: //')"
ours_ms=$(median_ms "$out/metrics.csv")
ours_loss=$(grep "val loss" "$out/train.log" | tail -n 1 | sed 's/.*val loss \([0-9.]*\).*/\1/')
printf "tricycle (%s): wall %.1f s, median %.2f ms/step, val loss %s\n" "$ours_build" "$ours_wall" "$ours_ms" "$ours_loss"

if [ "${BENCH_SKIP_PYTORCH:-0}" != 1 ]; then
    # PyTorch at its fastest here: 1 and 2 threads of its own, each with 1 and 2 OpenBLAS threads, in
    # fp32 and with bfloat16 autocast; every setting is printed and the fastest runs the recipe.
    best_ms=1e9
    echo "pytorch probes (ms per training step; a probe more than 3x slower than the best so far stops early):"
    for blas in 1 2; do
        while read -r _ threads precision ms; do
            threads=${threads#threads=} precision=${precision#precision=} ms=${ms#ms_per_step=}
            printf "  %-6s %d PyTorch thread(s), %d OpenBLAS thread(s): %8.2f ms/step\n" "$precision" "$threads" "$blas" "$ms"
            if awk "BEGIN { exit !($ms < $best_ms) }"; then best_ms=$ms best_threads=$threads best_blas=$blas best_precision=$precision; fi
        done < <(OPENBLAS_NUM_THREADS=$blas /usr/bin/python3 bench/pytorch_baseline.py --train data/char_train.bin --val data/char_val.bin \
                     --vocab-size 257 --probe | grep '^PROBE')
    done
    OPENBLAS_NUM_THREADS=$best_blas /usr/bin/python3 bench/pytorch_baseline.py --train data/char_train.bin --val data/char_val.bin \
        --vocab-size 257 --steps "$steps" --threads "$best_threads" --precision "$best_precision" | tee "$out/pytorch.log"
    result=$(grep '^RESULT' "$out/pytorch.log")
    field() { sed "s/.* $1=\([^ ]*\).*/\1/" <<< "$result"; }
    torch_wall=$(field wall_s) torch_ms=$(field ms_per_step) torch_loss=$(field val_loss)
    echo
    printf "%-44s %10s %12s %10s %10s\n" "" "wall (s)" "ms/step" "tokens/s" "val loss"
    printf "%-44s %10.1f %12.2f %10.0f %10s\n" "tricycle ($ours_build)" "$ours_wall" "$ours_ms" "$(calc "768000 / $ours_ms")" "$ours_loss"
    printf "%-44s %10.1f %12.2f %10.0f %10s\n" "pytorch ($best_precision, $best_threads thread, OpenBLAS $best_blas)" "$torch_wall" "$torch_ms" \
        "$(calc "768000 / $torch_ms")" "$torch_loss"
    printf "tricycle / pytorch: wall %.2fx, ms/step %.2fx\n" "$(calc "$ours_wall / $torch_wall")" "$(calc "$ours_ms / $torch_ms")"
fi

echo
echo "== where the time goes: one training step of the recipe, per kernel and matrix product"
./train_gpt --train data/char_train.bin --val data/char_val.bin --tokenizer data/bytes.tok --out "$out/profile" "${recipe[@]}" \
    --steps 100 --eval-interval 0 --profile | sed -n '/^profile over/,$p' | grep -v '^done'

echo
echo "== each step against its product floor (the step's own matrix products run alone, primitives cached)"
echo "   and the product peak (a 2048^3 product through the same engine), in both precisions (bench_gpt)"
printf "%-34s %-6s %10s %10s %11s %12s %11s  %s\n" "shape" "build" "ms/step" "floor ms" "step/floor" "peak GFLOPS" "peak share" "products"
recipe_shape=(--layers 4 --heads 4 --dim 128 --vocab 257 --context 64 --batch 12 --seq 64 --steps 30)
for shape in recipe gpt2; do
    if [ "$shape" = recipe ]; then label="the recipe (4L 128d, B=12 T=64)" args=("${recipe_shape[@]}")
    else label="GPT-2 124M, B=4 T=64" args=(--steps 5); fi
    for precision in bf16 float; do
        programs=$TRICYCLE_PROGRAMS_FLOAT
        [ "$precision" = bf16 ] && programs=$TRICYCLE_PROGRAMS_BF16
        log=$("$programs/bench_gpt" "${args[@]}")
        result=$(grep '^RESULT' <<< "$log")
        field() { sed "s/.* $1=\([^ ]*\).*/\1/" <<< "$result"; }
        printf "%-34s %-6s %10s %10s %11s %12s %11s  %s\n" "$label" "$precision" "$(field ms_per_step)" "$(field floor_ms)" \
            "$(field floor_ratio)" "$(field peak_gflops)" "$(field peak_share)" "$(sed -n 's/^matrix products: //p' <<< "$log")"
    done
done
echo "targets: the recipe's step at most 2x its floor; GPT-2 124M at a peak share of 0.85 or more"
echo "(llm.c's CPU train_gpt2.c, 2 threads, runs the GPT-2 124M shape at ~5.5 s/step here)"

echo
echo "== GPU build: registers and spills per kernel (nvcc -Xptxas -v; nothing runs)"
bash bench/kernel_report.sh | grep -E "kernels compiled|total spill"
