#!/usr/bin/env bash
# PyTorch parity: tests/gpt_parity writes a GPT, a batch and Tricycle's results for two model kinds;
# tests/pytorch_parity.py recomputes them with PyTorch (Debian's python3-torch) and compares.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# Each model kind twice: with the plain attention kernels and with the flash-style pair.
for attention in plain flash; do
    flag=$([ $attention = flash ] && echo --flash || true)
    mkdir -p "$dir/gelu_layernorm_$attention" "$dir/swiglu_rmsnorm_$attention"
    ./tests/gpt_parity "$dir/gelu_layernorm_$attention" $flag
    ./tests/gpt_parity "$dir/swiglu_rmsnorm_$attention" --swiglu --rmsnorm --rotary --untied $flag
done
/usr/bin/python3 tests/pytorch_parity.py "$dir"/*_plain "$dir"/*_flash
