"""Load YAML into frozen, typed dataclasses, strictly.

Where it sits: ``specfleet.core.config`` declares the schema as dataclasses; this
module turns a YAML file into instances of them at start-up, before anything else
runs. Errors name the file and the key path (``configs/local.yaml: verifier.tp_size:
expected int, got 'two'``) so a user can fix their file without reading code.

Written here rather than taken from pydantic because the schema is plain frozen
dataclasses with ``help`` metadata (one place for types, defaults and docs, readable
without a library) and the walk below is short.

Supported field types: bool, int, float, str, ``Literal[...]``, ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses. A field's
``metadata`` may hold ``help`` (text) and ``min`` (inclusive lower bound for numbers).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration file is malformed; the message names file and key path."""


def load_yaml_file(path: str | Path, schema: type[T]) -> T:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    return from_mapping(raw, schema, source=str(path))


def from_mapping(raw: Any, schema: type[T], source: str = "<config>") -> T:
    try:
        return _convert(raw, schema, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path or '<top level>'}: {message}")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, path)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        names = " or ".join(_type_name(o) for o in options)
        raise _fail(path, f"expected {names}, got {_describe(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise _fail(path, f"expected one of {choices}, got {_describe(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {_describe(value)}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {_describe(value)}")
        _key_tp, val_tp = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(path, f"keys must be strings, got {_describe(k)}")
            out[k] = _convert(v, val_tp, f"{path}.{k}" if path else k)
        return out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"expected bool, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, f"expected str, got {_describe(value)}")
        return value
    raise TypeError(f"typed_yaml cannot handle type {tp!r} at {path}")  # a schema bug


def _convert_dataclass(value: Any, cls: type, path: str) -> Any:
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping, got {_describe(value)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        key = unknown[0]
        known = ", ".join(sorted(fields))
        raise _fail(_join(path, str(key)), f"unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in value:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise _fail(key_path, "missing required key")
            continue
        converted = _convert(value[name], hints[name], key_path)
        minimum = f.metadata.get("min")
        if minimum is not None and converted is not None and converted < minimum:
            raise _fail(key_path, f"must be >= {minimum}, got {converted}")
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise _fail(path, str(exc)) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_plain(obj: Any) -> Any:
    """Dataclasses → plain dicts/lists (for ``config show`` and logging)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


__all__ = ["ConfigError", "load_yaml_file", "from_mapping", "to_plain"]
