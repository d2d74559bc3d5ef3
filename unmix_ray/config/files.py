"""Reading config YAML and applying ``--set key.path=value`` overrides, with one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from unmix_ray.config.base import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _yaml_problem(e: yaml.YAMLError, where: str) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is not None:
        return f"{where}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {what}"
    return f"{where}: YAML syntax error: {what}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file, a syntax error or a non-mapping is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read ({e.strerror or e})"]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(e, str(path))]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict; every malformed one
    is reported, together, as a ConfigError."""
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            column = f" at column {len(key) + 2 + mark.column}" if mark is not None else ""
            problems.append(f"--set {item!r}: the value is not valid YAML "
                            f"({getattr(e, 'problem', None) or 'syntax error'}{column})")
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {p} is not a mapping")
                break
        else:
            node[leaf] = value
    if problems:
        raise ConfigError(problems, "override")
    return out
