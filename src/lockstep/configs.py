"""`lockstep configs`: the shipped example configs, listed and copied to start from."""

from __future__ import annotations

import shutil
from pathlib import Path

from lockstep.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def examples_dir() -> Path:
    if not EXAMPLES.is_dir():
        raise ConfigError(
            f"the example configs ship with lockstep's source checkout (examples/), not found "
            f"at {EXAMPLES}; clone the repository and install it with scripts/setup.sh"
        )
    return EXAMPLES


def available() -> dict[str, tuple[Path, str]]:
    """name -> (file, one-line description from its first comment line)."""
    out = {}
    for path in sorted(examples_dir().glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = (path, first.lstrip("# ").strip())
    return out


def listing() -> str:
    items = available()
    width = max(map(len, items))
    lines = [f"{name:<{width}}  {desc}" for name, (_, desc) in items.items()]
    return "\n".join([*lines, "", "lockstep configs copy NAME [DEST] copies one to start from."])


def copy(name: str, dest: str | None) -> Path:
    items = available()
    if name not in items:
        raise ConfigError(f"no example config {name!r}; available: {', '.join(items)}")
    target = Path(dest or f"{name}.yaml")
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists():
        raise ConfigError(f"{target} exists; choose another destination (nothing was changed)")
    shutil.copyfile(items[name][0], target)
    return target
