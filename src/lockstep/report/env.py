"""`lockstep env`: what a bug report needs first: versions, devices, and which lockstep runs."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import lockstep


def _version(dist_name: str) -> str:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        return "not installed"


def install_kind() -> str:
    """'editable' (pip install -e), 'installed' (a copy in site-packages) or 'source' (no install)."""
    try:
        dist = md.distribution(lockstep.DISTRIBUTION)
    except md.PackageNotFoundError:
        return "source (not installed; imported from the path)"
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return "editable"
    return "installed"


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + (" (uncommitted changes)" if dirty else "")


def collect() -> dict[str, Any]:
    import torch

    location = Path(lockstep.__file__).resolve().parent
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "lockstep": lockstep.__version__,
        "lockstep_path": str(location),
        "lockstep_install": install_kind(),
        "lockstep_git_commit": git_commit(location),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "datasets": _version("datasets"),
        "safetensors": _version("safetensors"),
        "accelerator": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else f"not available (built for {torch.version.cuda})",
        "nccl": _nccl(torch) if cuda else "not available",
        "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
    }
    return info


def _nccl(torch: Any) -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # no NCCL in this build
        return "not available"


def render(info: dict[str, Any]) -> str:
    width = max(map(len, info))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
