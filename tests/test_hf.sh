#!/usr/bin/env bash
# Runs tests/test_hf.py with the Python that has transformers, tokenizers and safetensors when one
# exists: $HF_PYTHON, else the virtual environment .venv-hf that .ci/run makes, else Debian's python3 (the
# checks that need those packages are then counted as skipped).
python=${HF_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv-hf/bin/python ]; then python=.venv-hf/bin/python; else python=/usr/bin/python3; fi
fi
exec "$python" tests/test_hf.py
