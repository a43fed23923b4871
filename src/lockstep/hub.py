"""The Hugging Face Hub, as lockstep meets it: a name that is not a local path.

Loading a hub name without a connection makes transformers and datasets retry for tens of
seconds before failing. lockstep asks first whether the name is already in the local cache, and
if not, whether the hub answers at all (one connection attempt, a few seconds), so an offline
machine gets its answer at once, with the way out.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def looks_like_id(name: str) -> bool:
    """Whether `name` is written as a hub id (`org/name` or `name`) rather than a local path:
    it starts with none of `.`, `/`, `~` and holds at most one `/`. Says nothing about whether
    a local file of that name exists (callers look first)."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def offline_problem(name: str, kind: str, cached_file: str) -> str | None:
    """Why `name` cannot be loaded from the hub here, or None if it may be: it is cached
    (`cached_file` of it is in the local hub cache), or the hub answers. `kind`: 'model' or
    'dataset'."""
    if _cached(name, kind, cached_file):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "it is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    host = urlparse(_endpoint()).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return f"it is not in the local Hugging Face cache, and {host} cannot be reached (offline?)"
    return None


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return "https://huggingface.co"


def _cached(name: str, kind: str, cached_file: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    try:
        found = try_to_load_from_cache(name, cached_file, repo_type=kind)
    except Exception:  # an invalid repo id: not cached
        return False
    return isinstance(found, str)
