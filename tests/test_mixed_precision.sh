#!/usr/bin/env bash
# The bfloat16 build against the float build: the float binary writes its layer outputs and training
# losses, the bfloat16 binary computes the same and compares (see tests/mixed_precision.cu).
set -eu
reference=$(mktemp)
trap 'rm -f "$reference"' EXIT
./tests/mixed_precision_fp32 write "$reference"
./tests/mixed_precision_bf16 compare "$reference"
