#!/usr/bin/env bash
# Create .venv and install lockstep with everything it needs (safe to run again).
# torch comes first, pinned, so that nothing pulls a different build:
#   - a torch already in .venv is kept (a GPU user installs theirs there first);
#   - with an NVIDIA GPU visible, pip's default torch build (CUDA) is installed;
#   - otherwise the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
if .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch (CUDA build)"
    "${PIP[@]}" install -q torch
else
    echo "setup: no GPU, installing torch==2.13.0 (CPU)"
    "${PIP[@]}" install -q torch==2.13.0
fi
echo "setup: installing lockstep (editable) and its dependencies"
"${PIP[@]}" install -q -e ".[dev]"
