"""Error text for configs: a pydantic error -> the dotted key, the value, what is allowed,
and for an unknown key the valid one it most likely meant."""

from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import BaseModel, ValidationError


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves); list items appear as key.N.field."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _sub_model(field.annotation)
        if sub is not None:
            item = ".N." if _is_list(field.annotation) else "."
            keys.extend(known_keys(sub, dotted + item))
    return keys


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        sub = _sub_model(arg)
        if sub is not None:
            return sub
    return None


def did_you_mean(key: str, root: type[BaseModel]) -> str | None:
    """The valid key a typo most likely meant: a sibling first, then the same leaf elsewhere."""
    parts = ["N" if p.isdigit() else p for p in key.split(".")]
    candidates = known_keys(root)
    parent, leaf = ".".join(parts[:-1]), parts[-1]
    siblings = [c for c in candidates if c.rsplit(".", 1)[0] == parent and c != parent]
    if not parent:
        siblings = [c for c in candidates if "." not in c]
    names = {c.rsplit(".", 1)[-1]: c for c in siblings}
    close = difflib.get_close_matches(leaf, list(names), n=1, cutoff=0.6)
    if close:  # restore the user's list indices (data.train.0.pth -> data.train.0.path)
        fixed = names[close[0]].split(".")
        return ".".join(p if p.isdigit() else f for p, f in zip(key.split("."), fixed, strict=True))
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates if "N" not in c.split(".")}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


SCALAR_TAGS = {"str", "int", "float", "bool", "none"}


def _is_tag(part: Any) -> bool:
    """A part of a pydantic error location that names a branch of a union (`literal['auto']`,
    `list[str]`, `constrained-int`, `bool`) rather than a config key."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in SCALAR_TAGS)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _is_tag(p)) or "(top level)"


def explain(err: ValidationError, root: type[BaseModel]) -> str:
    """One readable message for every problem pydantic found in a config of schema `root`; the
    branches of a union (a literal or a number, say) are one line: `allowed ..., or expected ...`."""
    lines: list[str] = []
    wrong: dict[tuple[str, str], list[str]] = {}  # (key, value) -> what each branch allows
    for e in err.errors(include_url=False):
        key = _dotted(e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            hint = did_you_mean(key, root)
            msg = f"unknown key {key!r}" + (f" (did you mean {hint}?)" if hint else "")
        elif kind == "missing":
            msg = f"{key}: required, but missing"
        else:
            got = _short(e.get("input"))
            allowed = wrong.setdefault((key, got), [])
            if not allowed:
                lines.append((key, got))  # a placeholder, filled in below
            if _allowed(e) not in allowed:
                allowed.append(_allowed(e))
            continue
        if msg not in lines:
            lines.append(msg)
    text = [
        line if isinstance(line, str) else f"{line[0]}: got {line[1]}: " + ", or ".join(wrong[line])
        for line in lines
    ]
    if len(text) == 1:
        return f"invalid config: {text[0]}"
    return "invalid config:\n" + "\n".join(f"  - {m}" for m in text)


def _allowed(e: dict[str, Any]) -> str:
    msg = str(e.get("msg", "invalid value"))
    ctx = e.get("ctx") or {}
    if e["type"] in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        return msg.replace("Input should be", "expected a number")
    if e["type"].startswith("literal"):
        return msg.replace("Input should be", "allowed values are")
    if e["type"] in ("model_type", "dict_type"):
        return "expected a mapping of keys (a section)"
    if ctx.get("error"):
        return str(ctx["error"])
    return msg.replace("Input should be", "expected")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
