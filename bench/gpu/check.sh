#!/usr/bin/env bash
# The GPU check: a smoke run of lockstep's GPU paths on one CUDA GPU in under 8 minutes, with
# no package index: bf16 mixed precision, LoRA, QLoRA, packing with variable-length attention on
# 2 rows (and its logits-isolation check), FSDP2 on one process with LoRA and a resume, the GPU
# memory of a resumed (DDP) checkpoint, gradient checkpointing, compile. Each case is a real
# `lockstep train` with its own time limit (bench/gpu/check.py says what each one checks).
# `--cases bench` runs the 1B Llama-shaped packed benchmark instead (bench/gpu/run.py): lockstep
# and TRL's SFTTrainer under the same settings, 10 steps each, tokens/s/GPU, MFU and peak GPU
# memory per tool and lockstep / TRL, as a second table of the same results files. TRL's wheel
# travels in .whl/ too; where trl does not import, TRL's row says "skipped: <why>" and lockstep's
# row is still reported.
#
#   bash bench/gpu/check.sh --prepare [--wheels DIR] [PIP_OPTION...]
#       On any machine whose pip reaches a package index (a CPU is fine): download the wheels
#       lockstep needs that the GPU image lacks (bench/gpu/wheels.txt, CPython 3.12, manylinux
#       x86_64, no dependencies) into .whl/ (git-ignored), replacing what was there, and list
#       them. PIP_OPTIONs go to `pip download` (e.g. --index-url for a mirror).
#   bash bench/gpu/check.sh [--wheels DIR] [--out DIR] [--cases a,b] [--budget-s S]
#       On the GPU machine: install the wheels into /tmp/lockstep-site (pip --no-index
#       --no-deps --target), import lockstep from src/ (PYTHONPATH; lockstep is not installed),
#       build a small random Llama-shaped model and data, run the cases, write the results
#       folder: $OUT when set, else bench/gpu/work/check-results (--out wins): summary.json (per
#       case: ok/failed/skipped, seconds, tokens/s, peak GPU memory, the error's last lines),
#       summary.txt (the same as a table) and logs.txt (a short log of every case).
#       Exit 0 when every case passed, 1 when one did not; 2 at once, with one line, where no
#       CUDA device is visible or lockstep cannot be imported.
#   bash bench/gpu/check.sh --install DIR [--wheels DIR]
#       Only install the wheels into DIR (the first step of the check).
#
# Without flash-attn (no wheel of it exists for torch 2.11): packing runs lockstep's
# attn_implementation=auto choice without it, and the isolation check also tries sdpa and
# flex_attention; summary.json names the implementations it ran.
#
# With the device tool (a lent H200, torch 2.11 + transformers 5.17, nothing reachable):
#   here, once:  bash bench/gpu/check.sh --prepare          (46 MiB into .whl/)
#   the check:   command "bash bench/gpu/check.sh", carry [".whl"], timeout_s 540
#   the bench:   command "bash bench/gpu/check.sh --cases bench", carry [".whl"], timeout_s 420
#   each returns $OUT/summary.json, summary.txt, logs.txt (the tool returns at most 8 files)
# The check's cases stop by 420 s (--budget-s); the wheel install, the versions and the model
# build come before them (8 minutes in all), so 540 s is only a backstop. The bench is a second
# command because both do not fit in one 600-s command: it stops by 360 s (its case limit, or
# --budget-s if smaller), building the 1B model and data first, then lockstep and then TRL, each
# killed with its children past 200 s or past its equal share of the time left (lockstep at most
# half), so a slow tool cannot take the other's time or the session's; 420 s is the backstop.
# Device time: a session has 15 minutes in all, the machine's start (a minute or more) counted,
# so both commands fit only when the check ends early: run first the one the session is for,
# then the other at once (warm machine) with --budget-s no more than status's budget_left_s
# less 90. A failed case can be rerun the same way with `bash bench/gpu/check.sh --cases NAME`.
# Python: $PYTHON when set, else python3 (the GPU image's python3 holds torch).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
SITE=/tmp/lockstep-site
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

die() { # one line on stderr, then exit 2
  echo "check.sh: $1" >&2
  exit 2
}

# Download every wheel of wheels.txt into $1 (a fresh folder, swapped in when all arrived).
prepare() {
  local dest=$1
  shift
  local tmp="$dest.partial" platform_args=() want got
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$tmp" -r "$HERE/wheels.txt" "$@"; then
    rm -rf "$tmp"
    die "pip could not download the wheels of bench/gpu/wheels.txt (see pip's message above); $dest is unchanged"
  fi
  want=$(grep -cE '^[A-Za-z0-9]' "$HERE/wheels.txt")
  got=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
  if [[ "$got" -ne "$want" ]]; then
    rm -rf "$tmp"
    die "pip fetched $got wheels for the $want pins of bench/gpu/wheels.txt; $dest is unchanged"
  fi
  rm -rf "$dest"
  mv "$tmp" "$dest"
  echo "fetched into $dest:"
  (cd "$dest" && du -k -- *.whl | sort -k2 | awk '{printf "  %8.1f MiB  %s\n", $1 / 1024, $2}')
  echo "  total $(du -sk "$dest" | awk '{printf "%.1f", $1 / 1024}') MiB (the device tool carries at most 64 MiB with the working tree)"
}

# Install every wheel of $1 into the folder $2, offline, without dependencies.
install_wheels() {
  local wheels=$1 target=$2
  shopt -s nullglob
  local files=("$wheels"/*.whl)
  shopt -u nullglob
  if [[ ${#files[@]} -eq 0 ]]; then
    echo "check.sh: no wheels in $wheels: using the packages $PYTHON has" >&2
    return 0
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$target" "${files[@]}" ||
    die "installing the wheels of $wheels into $target failed (see pip's message above)"
}

# Exit 2 with one line unless $PYTHON's torch sees a CUDA device.
require_cuda() {
  local why
  why=$("$PYTHON" -c '
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"{sys.executable} cannot import torch ({e})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} of {sys.executable} sees none")
' 2>&1) || die "no CUDA device: $why. Run the check on a GPU machine; here only --prepare runs"
}

main() {
  local mode=check wheels="$ROOT/.whl" target="" args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --prepare) mode=prepare ;;
      --install)
        mode=install
        target=${2:?--install needs a folder}
        shift
        ;;
      --wheels)
        wheels=${2:?--wheels needs a folder}
        shift
        ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  case "$mode" in
    prepare) prepare "$wheels" ${args[@]+"${args[@]}"} ;;
    install) install_wheels "$wheels" "$target" ;;
    check)
      require_cuda
      rm -rf "$SITE"
      install_wheels "$wheels" "$SITE"
      export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
      export PYTHONUNBUFFERED=1
      local why
      why=$("$PYTHON" -c 'import lockstep.config, lockstep.training.loop' 2>&1 | tail -n 1) ||
        die "lockstep cannot be imported ($why): run 'bash bench/gpu/check.sh --prepare' where pip reaches an index, and bring .whl along"
      cd "$ROOT"
      exec "$PYTHON" "$HERE/check.py" ${args[@]+"${args[@]}"}
      ;;
  esac
}

main "$@"
