"""Configs are plain dataclasses that round-trip through JSON, checked on load.

`from_dict` checks every value against its field's type (an int where an int is due; JSON `true` is not a
number and "six" is not an int) and against bounds declared with `bounded(...)`, then runs the class's own
`check()` for rules across fields. Errors name the field by its dotted path, e.g. `model.num_layers`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the field."""


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple | None = None) -> Any:
    """A dataclass field whose value must satisfy the given bounds (checked by `Config.validate`)."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"bounds": rules})


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; FileNotFoundError or ConfigError (a ValueError) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(value: Any, kind: Any, where: str, strict: bool = True) -> Any:
    """`value` as type `kind`, or ConfigError. Accepts JSON forms: lists for tuples, ints for floats."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where, strict)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(kind)}, got {_describe(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: must be one of {list(args)}, got {_describe(value)}")
    if isinstance(kind, type) and issubclass(kind, Config):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object ({kind.__name__}), got {_describe(value)}")
        return kind.from_dict(value, strict=strict, where=where)
    if origin in (tuple, list) or kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [coerce(v, a, f"{where}[{i}]", strict) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [coerce(v, item, f"{where}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(items) if (origin or kind) is tuple else items
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {_describe(value)}")
        key_kind, item_kind = args if args else (Any, Any)
        return {coerce(k, key_kind, f"{where} key", strict): coerce(v, item_kind, f"{where}.{k}", strict)
                for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif isinstance(kind, type) and isinstance(value, kind):
        return value
    raise ConfigError(f"{where}: expected {_type_name(kind)}, got {_describe(value)}")


def check_bounds(value: Any, rules: dict, where: str) -> None:
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{where}: must be one of {list(rules['choices'])}, got {_describe(value)}")
    numbers = value if isinstance(value, (tuple, list)) else (value,)
    for v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: must be a finite number, got {v}")
        for op, limit, ok in (("ge", ">=", v >= rules.get("ge", -math.inf)), ("gt", ">", v > rules.get("gt", -math.inf)),
                              ("le", "<=", v <= rules.get("le", math.inf)), ("lt", "<", v < rules.get("lt", math.inf))):
            if not ok:
                raise ConfigError(f"{where}: must be {limit} {rules[op]}, got {v}")


@dataclasses.dataclass
class Config:
    """Base for every config: `to_dict`/`from_dict`, `save`/`load` as JSON, typed and bounded on load."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True, where: str = "") -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.__name__}: expected a JSON object, got {_describe(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ConfigError(f"{where + ': ' if where else ''}unknown config keys {unknown} for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {f.name: coerce(data[f.name], hints.get(f.name, Any), f"{where}.{f.name}".lstrip("."), strict)
                  for f in dataclasses.fields(cls) if f.name in data and f.init}
        try:
            config = cls(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # a class's own __post_init__ rules
            raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
        config.validate(where)
        return config

    def validate(self, where: str = "") -> None:
        """Bounds of every field, then the class's cross-field `check()`; nested configs are checked by from_dict
        (or here, when the config was built in Python)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            path = f"{where}.{f.name}".lstrip(".")
            if isinstance(value, Config):
                value.validate(path)
            check_bounds(value, f.metadata.get("bounds", {}), path)
        try:
            self.check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where + ': ' if where else ''}{e}") from None

    def check(self) -> None:
        """Rules across fields (override); raise ValueError with a message naming the fields."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path, strict: bool = True) -> T:
        data = read_json_object(path)
        try:
            return cls.from_dict(data, strict=strict)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None

    def replace(self: T, **changes: Any) -> T:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config
