"""The typed-config base: pydantic models that reject unknown keys, non-finite numbers and bad values,
and ``build`` that reports every problem of a config at once as ``dotted.path: what is wrong``.

Configs are validated at the edge so that a typo or an out-of-range value fails before any cluster
resources are taken, with one message naming every problem (not just the first).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """One or more config problems; ``problems`` lists each as ``"path: what is wrong"``."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self):  # crosses process boundaries (Ray) with its message intact
        return type(self), (self.problems, self.source)


def invalid(message: str) -> PydanticCustomError:
    """A validator's error whose text is ``message`` exactly (raise it from a field validator)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


def _init_details(e: ValidationError) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for err in e.errors(include_url=False):
        if err["type"] == "invalid":
            out.append({"type": invalid(err["msg"]), "loc": err["loc"], "input": err["input"]})
        else:
            out.append({k: v for k, v in err.items() if k in ("type", "loc", "input", "ctx")})  # type: ignore[misc]
    return out


class Model(BaseModel):
    """A config block: frozen, unknown keys rejected, NaN and infinities rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (tuples become lists): what crosses Ray and goes to YAML."""
        return self.model_dump(mode="json")

    @classmethod
    def raw_problems(cls, data: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, problem) pairs found on the raw input: relations between fields that must be reported
        even when one of the fields is itself invalid (field validators only see valid fields)."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _with_raw_problems(cls, data: Any, handler: Any) -> Any:
        extra = cls.raw_problems(data) if isinstance(data, dict) else []
        if not extra:
            return handler(data)
        errors: list[InitErrorDetails] = []
        try:
            handler(data)
        except ValidationError as e:
            errors = _init_details(e)
        errors += [{"type": invalid(msg), "loc": (field,), "input": data.get(field)} for field, msg in extra]
        raise ValidationError.from_exception_data(cls.__name__, errors)


def build(cls: type[M], data: Any, path: str = "", errors: list[str] | None = None) -> M | None:
    """Validate ``data`` into ``cls``. With ``errors`` given, problems are appended to it (and None is
    returned on failure); without, they are raised together as one ConfigError."""
    where = path or cls.__name__
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = [f"{join_path(where, err['loc'])}: {describe(err, cls)}" for err in e.errors()]
    if errors is None:
        raise ConfigError(problems)
    errors.extend(problems)
    return None


def join_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        else:
            return tp


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the block at ``loc`` inside ``model`` (for "unknown key" messages)."""
    current: Any = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = _unwrap(field.annotation)
        elif get_origin(current) in (dict, typing.Mapping) or current is dict:
            args = get_args(current)
            current = _unwrap(args[1]) if len(args) == 2 else Any
        elif get_origin(current) in (list, tuple):
            args = get_args(current)
            current = _unwrap(args[0]) if args else Any
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def describe(err: ErrorDetails, model: type[BaseModel]) -> str:
    """One problem in words, with the value that caused it."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        known = _known_keys(model, tuple(err["loc"][:-1]))
        return "unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, bound = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
                     "less_than_equal": ("<=", "le")}[kind]
        return f"must be {op} {ctx[bound]}, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx.get('expected')}"
    if kind == "too_short":
        if ctx.get("min_length") == 1 and isinstance(value, (list, tuple, dict)) and not value:
            return "must not be empty"
        return f"expected at least {ctx.get('min_length')} values, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} values, got {ctx.get('actual_length')}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true/false, got {value!r}"
    if kind in ("string_type",):
        return f"expected a string, got {value!r}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {value!r}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {value!r}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")
