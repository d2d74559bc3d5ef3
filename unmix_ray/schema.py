"""Turn plain YAML dicts into typed, frozen dataclasses, collecting every problem at once.

Configs are validated at the edge so that a typo or an out-of-range value fails before any
cluster resources are taken, with one message naming every problem (not just the first).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more config problems; ``problems`` lists each as ``"path: what is wrong"``."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


def build(cls: type[T], data: Any, path: str = "", errors: list[str] | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; raise ConfigError naming every problem."""
    own = errors is None
    errors = [] if own else errors
    value = _convert(cls, data, path or cls.__name__, errors)
    if own and errors:
        raise ConfigError(errors)
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list tree (tuples become lists), the inverse of ``build``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, errors)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path, errors)
        for a in inner:  # first member that converts cleanly wins
            trial: list[str] = []
            out = _convert(a, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            errors.append(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {value!r}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                errors.append(f"{path}: expected {len(args)} values, got {len(value)}")
                return tuple(value)
            return tuple(_convert(a, v, f"{path}[{i}]", errors) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _convert_dataclass(cls: Any, value: Any, path: str, errors: list[str]) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping, got {value!r}")
        return None
    hints = get_type_hints(cls, vars(typing) | vars(_module_of(cls)))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            errors.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    n_before = len(errors)
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{path}.{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}.{name}: missing")
    if len(errors) > n_before:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if callable(check):
        errors.extend(f"{path}.{p}" for p in check())
    return obj


def _module_of(cls: Any) -> types.ModuleType:
    import sys

    return sys.modules[cls.__module__]
