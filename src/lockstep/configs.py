"""`lockstep configs`: the example configs shipped inside the package, listed and copied to
start from; `lockstep train NAME` runs one by its name.

The examples read the demo data shipped beside them as `builtin:demo_train.jsonl` (resolved by
lockstep.data.sources), so a shipped config, or a copy of one, runs from any folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lockstep import DISTRIBUTION
from lockstep.data.sources import BUILTIN_DATA, builtin_names
from lockstep.errors import ConfigError, reason

EXAMPLES = Path(__file__).resolve().parent / "examples"


def available() -> dict[str, tuple[Path, str]]:
    """name -> (file, one-line description from its first comment line)."""
    files = sorted(EXAMPLES.glob("*.yaml"))
    if not files:
        raise ConfigError(
            f"the example configs are missing from this lockstep install (looked in {EXAMPLES}); "
            f"reinstall it: pip install --force-reinstall --no-deps {DISTRIBUTION}"
        )
    out = {}
    for path in files:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = (path, first.lstrip("# ").strip())
    return out


def listing() -> str:
    """The examples, one per line with its description, then how to use them and their data."""
    items = available()
    width = max(map(len, items))
    lines = [f"{name:<{width}}  {desc}" for name, (_, desc) in items.items()]
    return "\n".join(
        [
            *lines,
            "",
            "lockstep train NAME runs one; lockstep configs copy NAME [DEST] copies one to edit.",
            f"Their data ({', '.join(builtin_names())}) ships with lockstep, in {BUILTIN_DATA}.",
        ]
    )


def resolve(arg: str) -> str:
    """The config file a command's CONFIG argument names: a path that exists is itself; a bare
    name that is not a file here is the shipped example of that name (`lockstep train demo`).
    A bare name that is neither is a ConfigError listing the examples; any other missing
    path is returned as given, for the config loader to report."""
    p = Path(arg)
    if p.exists() or p.suffix or len(p.parts) != 1:
        return arg
    items = available()
    if arg in items:
        return str(items[arg][0])
    raise ConfigError(
        f"config file {arg!r} not found (looked in {p.resolve()}), and no example config has "
        f"that name; examples: {', '.join(items)} (lockstep configs list)"
    )


def copy(name: str, dest: str | None) -> Path:
    """Copy example `name` to `dest` (a file, or a folder to put NAME.yaml in; default
    ./NAME.yaml), never over an existing file. Its data paths are `builtin:` ones, so the copy
    runs from any folder as it is."""
    items = available()
    if name not in items:
        raise ConfigError(f"no example config {name!r}; available: {', '.join(items)}")
    target = Path(dest or f"{name}.yaml")
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists():
        raise ConfigError(f"{target} exists; choose another destination (nothing was changed)")
    try:
        shutil.copyfile(items[name][0], target)
    except OSError as e:
        raise ConfigError(f"cannot write {target}: {reason(e)}") from None
    return target
