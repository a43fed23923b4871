"""How this process trains, beyond the config: debug mode, replay of one rank, debugger rank."""

from __future__ import annotations

from dataclasses import dataclass

from lockstep.errors import LaunchError


@dataclass(frozen=True)
class RunOptions:
    debug: bool = False
    as_rank: tuple[int, int] | None = None  # (R, W): replay what rank R of W sees
    debug_rank: int | None = None


def parse_as_rank(text: str) -> tuple[int, int]:
    try:
        r, w = (int(x) for x in text.split("/"))
    except ValueError:
        raise LaunchError(f"--as-rank takes R/W (for example 1/2), got {text!r}") from None
    if not 0 <= r < w:
        raise LaunchError(f"--as-rank {text}: the rank R must be in 0..{w - 1}")
    return r, w
