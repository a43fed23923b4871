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
# lockstep was installed as "lockstep" before it was named lockstep-finetune: an editable
# install of this folder under the old name is removed (any other "lockstep" is left alone).
old=$(.venv/bin/python - <<'PY'
import importlib.metadata as md, json, pathlib
try:
    url = json.loads(md.distribution("lockstep").read_text("direct_url.json") or "{}").get("url", "")
except md.PackageNotFoundError:
    url = ""
print("yes" if url == pathlib.Path.cwd().resolve().as_uri() else "")
PY
)
if [ -n "$old" ]; then
    echo "setup: removing this checkout's install under its old name (lockstep)"
    "${PIP[@]}" uninstall -q -y lockstep
    rm -rf src/lockstep.egg-info  # its metadata, left in the source tree by the old install
fi
echo "setup: installing lockstep (as lockstep-finetune, editable) and its dependencies"
"${PIP[@]}" install -q -e ".[dev]"
