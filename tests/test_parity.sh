#!/usr/bin/env bash
# PyTorch parity: tests/gpt_parity writes a GPT, a batch and Tricycle's results for two model kinds;
# tests/pytorch_parity.py recomputes them with PyTorch (Debian's python3-torch) and compares.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/gelu_layernorm" "$dir/swiglu_rmsnorm"
./tests/gpt_parity "$dir/gelu_layernorm"
./tests/gpt_parity "$dir/swiglu_rmsnorm" --swiglu --rmsnorm --rotary --untied
/usr/bin/python3 tests/pytorch_parity.py "$dir/gelu_layernorm" "$dir/swiglu_rmsnorm"
