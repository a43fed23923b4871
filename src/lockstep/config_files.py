"""Reading a config: a YAML or JSON file (a duplicate key is refused, not overwritten) and
`key=value` overrides applied to it, into the plain dict that config.validate checks against
the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lockstep.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys: a silently overwritten key is a lost setting."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_text(text: str, source: str) -> Any:
    """Parse YAML (JSON is accepted too); errors name the source and line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{where}: {problem} (not valid YAML)") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{source}: cannot parse: {e}") from None


def read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise ConfigError(f"config file {str(p)!r} not found{hint} (looked in {p.resolve()})")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: {e.msg} (not valid JSON)") from None
        except RecursionError:
            raise ConfigError(f"{p}: nested too deeply to read") from None
        except _DuplicateKey as e:
            raise ConfigError(f"{p}: key {e.args[0]!r} appears twice in one mapping") from None
    else:
        raw = parse_text(text, str(p))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (as YAML configs do): the second would
    silently win."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def nul_key(raw: Any, prefix: str = "") -> str | None:
    """The dotted key of the first string holding a NUL character (no path or name can)."""
    if isinstance(raw, str):
        return prefix or "(top level)" if "\x00" in raw else None
    items = (
        raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    )
    for k, v in items:
        found = nul_key(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply `dotted.key=value` in place; the value is parsed as a YAML scalar or list."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(
            f"override {override!r} is not of the form dotted.key=value (for example optim.lr=1e-4)"
        )
    value = parse_text(text, f"override {key}") if text.strip() else None
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:  # pragma: no cover - every branch above yields a dict or list
        raise ConfigError(f"override {key!r}: cannot set a key inside a {type(node).__name__}")


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override {where!r}: {part!r} is not an index of a list of {len(node)} items"
        )
    return int(part)
