"""Command-line flags generated from dataclasses, so options and configs are declared once."""
from __future__ import annotations

import argparse
import dataclasses

import yaml

from ..config import ConfigError


def parse_value(text: str):
    """'0.5' -> 0.5, 'true' -> True, '1,3,5' -> [1, 3, 5], 'every_other' -> 'every_other'."""
    if "," in text and not text.strip().startswith("["):
        return [parse_value(part) for part in text.split(",") if part]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _kind(annotation: str):
    a = str(annotation)
    if a.startswith("bool"):
        return "bool"
    if a.startswith("list") or a.startswith("dict"):
        return "value"
    for name, fn in (("int", int), ("float", float)):
        if a.startswith(name):
            return fn
    if a.replace(" ", "") == "str|None":  # a folder named `5` stays the string '5'
        return str
    if a.startswith("str |") or a.startswith("str|"):
        return "value"
    return str if a.startswith("str") else "value"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=(), group: str | None = None) -> list[str]:
    """One --flag per field (dashes for underscores), default SUPPRESS so that unset flags stay unset."""
    target = parser.add_argument_group(group) if group else parser
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f.type)
        if any(flag in a.option_strings for a in parser._actions):
            names.append(f.name)  # already declared by another dataclass (e.g. `layers`)
            continue
        if kind == "bool":
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif kind == "value":
            target.add_argument(flag, dest=f.name, type=parse_value, default=argparse.SUPPRESS, metavar="VALUE")
        else:
            target.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS)
        names.append(f.name)
    return names


def pick(args: argparse.Namespace, names) -> dict:
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def build_dataclass(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}")
    return cls(**values)
