#!/usr/bin/env bash
# Install diffsampler and its test dependencies into the current Python environment.
# torch==2.13.0 is the CPU build on this project's machines (a plain `torch` would pull a multi-GB CUDA build);
# on a GPU machine, install the torch you want first: this script keeps an already-installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -m pip install numpy ninja pybind11 "setuptools>=64" wheel
python -m pip install --no-build-isolation -e ".[test]"
