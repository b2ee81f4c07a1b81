"""Dataclasses from plain dicts with strict types, and ``key.path=value`` overrides: what every
typed config and recipe (the model's, the stages') is read through. Knows nothing of MoVA."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import fields
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(name: str, tp: Any, value: Any, default: Any = None) -> Any:
    """``value`` as type ``tp``; ``default``: the field's default, whose values a partial
    mapping for a dataclass keeps."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=name, base=default if isinstance(default, tp) else None)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        return [_coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: Any = None) -> T:
    """Build dataclass ``cls`` from ``data`` with strict types; unknown keys are errors. Keys
    ``data`` leaves out keep ``base``'s values (else the field's default), at every depth: a
    partial section keeps the defaults its parent gives it, not its class's."""
    hints = typing.get_type_hints(cls)
    init = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(init))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ValueError(f"unknown config key(s){where}: {unknown}; allowed: {sorted(init)}")
    kwargs = {} if base is None else {name: getattr(base, name) for name in init}
    for key, value in data.items():
        default = kwargs[key] if base is not None else _default(init[key])
        kwargs[key] = _coerce(f"{prefix}.{key}" if prefix else key, hints[key], value, default)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both else value
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: cannot parse the value: {exc}") from exc
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"override {item!r}: {part!r} is not an index of a list")
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {parts[i - 1]!r} is not a mapping")
            node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ValueError(f"override {item!r}: {last!r} is not an index of a list")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ValueError(f"override {item!r}: {parts[-2]!r} is not a mapping")
    return out
