"""Base class of the method configs: JSON round trip and validation with clear messages."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class MethodConfig:
    method: ClassVar[str] = ""
    router_lr: ClassVar[float] = 1e-3  # the trainer's default learning rate for the method's own parameters
    renamed: ClassVar[dict[str, str]] = {}  # old field name -> its name now: saved adapters and config files load

    def __post_init__(self):
        self._check_kinds()
        self.validate()

    def _check_kinds(self) -> None:
        """What every method's validate() would otherwise repeat: a boolean field holds a boolean (the string
        'false' is truthy) and a number is finite (inf and nan pass comparisons such as `>= 0` or fail them
        with a misleading message)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if str(f.type) == "bool":
                self._check(isinstance(value, bool), f.name, "true or false")
            elif isinstance(value, float):
                self._check(math.isfinite(value), f.name, "a finite number")

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def upgrade(cls, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """`data` with the fields' old names (cls.renamed) replaced by their names now; an old name and its new
        one given with different values is refused."""
        data = dict(data)
        for old, new in cls.renamed.items():
            if old not in data:
                continue
            value = data.pop(old)
            if new in data and data[new] != value:
                raise ConfigError(f"{source}: {cls.__name__} given both {old!r} = {value!r} (the old name of {new!r}) "
                                  f"and {new!r} = {data[new]!r}; give {new!r} alone")
            data.setdefault(new, value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "MethodConfig":
        data = cls.upgrade(data, source)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def _check(self, ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{field} = {getattr(self, field)!r}: expected {expected}")


def check_layers(cfg: MethodConfig, field: str, named: tuple[str, ...]) -> None:
    value = getattr(cfg, field)
    named = (*named, "last_third") if "every_other" in named else named  # where blocks can be skipped
    ok = value in named or (isinstance(value, (list, tuple)) and value and
                            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))
    cfg._check(ok, field, f"one of {named} or a non-empty list of layer indices")


def pick_layers(value, num_layers: int, field: str) -> list[int]:
    if isinstance(value, str):
        picked = {"all": range(num_layers), "every_other": range(1, num_layers, 2),
                  "last_third": range(num_layers - max(1, num_layers // 3), num_layers)}[value]
        if not picked:  # the method would do nothing, and train nothing
            raise ConfigError(f"{field} = {value!r} picks no block of a model with {num_layers} layer(s); "
                              "give the block indices as a list")
        return list(picked)
    bad = [i for i in value if i >= num_layers]
    if bad:
        raise ConfigError(f"{field}: layer indices {bad} out of range for a model with {num_layers} layers")
    return sorted(set(int(i) for i in value))


def parse_value(text: str):
    """'0.5' -> 0.5, 'true' -> True, '1,3,5' -> [1, 3, 5], 'every_other' -> 'every_other'."""
    if "," in text and not text.strip().startswith("["):
        return [parse_value(part) for part in text.split(",") if part]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
