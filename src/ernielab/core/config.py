"""Configs are plain dataclasses that round-trip through JSON."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")


@dataclasses.dataclass
class Config:
    """Base for every config: `to_dict`/`from_dict`, `save`/`load` as JSON."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], hints.get(f.name)
            if isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, Config):
                value = kind.from_dict(value, strict=strict)
            elif isinstance(value, list) and typing.get_origin(kind) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path, strict: bool = True) -> T:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, strict=strict)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)
