"""Base class of the method configs: JSON round trip and validation with clear messages."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    pass


MAX_WEIGHT = 100.0  # of a method's auxiliary loss: far above any useful value, far below an infinite loss


@dataclass
class MethodConfig:
    method: ClassVar[str] = ""
    router_lr: ClassVar[float] = 1e-3  # the trainer's default learning rate for the method's own parameters
    renamed: ClassVar[dict[str, str]] = {}  # old field name -> its name now: saved adapters and config files load
    flop_fields: ClassVar[tuple[str, ...]] = ()  # fields a FLOP count depends on: `depthmix flops` offers the method

    def __post_init__(self):
        for f in dataclasses.fields(self):  # types first (a config file can hold anything), then values
            setattr(self, f.name, checked_type(f"{type(self).__name__}.{f.name}", getattr(self, f.name), f.type))
        self.validate()

    def validate(self) -> None:
        pass

    def check_decoding(self) -> None:
        """Refuses a config whose model cannot decode with a KV cache: asked before a run whose evaluation
        generates, so that the refusal comes before training, not after it."""

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


def check_range(cfg: MethodConfig, field: str, low: float, high: float) -> None:
    """A number in [low, high]: bounds where the method still computes something finite and meaningful."""
    cfg._check(low <= getattr(cfg, field) <= high, field, f"a number in [{low:g}, {high:g}]")


def checked_type(name: str, value, annotation, source: str = ""):
    """value if it has the field's type (ints are accepted for floats; YAML 1.1 reads `1e-4` as a string, so a
    string holding a number is too), else a ConfigError naming the source, the option and the value. The one
    type check of options and method configs."""
    kind = str(annotation).replace(" ", "")
    optional = kind.endswith("|None")
    if value is None and optional:
        return None
    check = TYPE_CHECKS.get(kind.removesuffix("|None").split("[")[0], lambda v: (v, None))
    value, problem = check(value)
    if problem:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{name} = {value!r}: expected {problem}" + (" or null" if optional else ""))
    return value


def _bool(value):
    return value, None if isinstance(value, bool) else "true or false (a string such as 'false' is not a boolean)"


def _int(value):
    return value, None if isinstance(value, int) and not isinstance(value, bool) else "an integer"


def _float(value):
    number = _number(value)
    if number is None:
        return value, "a number"
    return (number, None) if math.isfinite(number) else (value, "a finite number")


def _str(value):
    return value, None if isinstance(value, str) else "a string (quote it in a YAML file)"


def _list_of_str(value):
    value = [value] if isinstance(value, str) else value
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return value, None if ok else "a non-empty list of strings"


def _dict(value):
    return value, None if isinstance(value, dict) else "a mapping"


TYPE_CHECKS = {"bool": _bool, "int": _int, "float": _float, "str": _str, "list": _list_of_str, "dict": _dict}


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


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
