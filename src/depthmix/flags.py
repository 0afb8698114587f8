"""Command-line flags generated from dataclasses, so options and configs are declared once."""
from __future__ import annotations

import argparse
import dataclasses

from .config import parse_value


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


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=(), group: str | None = None,
                        choices: dict[str, str] | None = None, only=None) -> list[str]:
    """One --flag per field (dashes for underscores; `only` limits them to those fields), default SUPPRESS so that
    unset flags stay unset; its help is the field's metadata["help"], its default and `choices[name]` (listed,
    not enforced here: the dataclass's validation says what is wrong with a value)."""
    target = parser.add_argument_group(group) if group else parser
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f.type)
        text = _help(f, (choices or {}).get(f.name))
        shared = next((a for a in parser._actions if flag in a.option_strings), None)
        if shared is not None:  # already declared by another method (e.g. `layers`): one flag, both meanings
            first = next((g.title for g in parser._action_groups if shared in g._group_actions), "")
            if not shared.help.startswith(f"{first}: "):
                shared.help = f"{first}: {shared.help}"
            shared.help = f"{shared.help} {group or cls.__name__}: {text}"
            names.append(f.name)
            continue
        if kind == "bool":
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
        elif kind == "value":
            target.add_argument(flag, dest=f.name, type=parse_value, default=argparse.SUPPRESS, metavar="VALUE",
                                help=text)
        else:
            target.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=text)
        names.append(f.name)
    return names


def _help(f: dataclasses.Field, choices: str | None) -> str:
    text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None
    shown = str(default).lower() if isinstance(default, bool) or default is None else default
    parts = [text.replace("%", "%%")] if text else []
    if choices:
        parts.append(f"choices: {choices}.".replace("%", "%%"))
    if default == "":
        parts.append("(required)")
    elif "default:" not in text:
        parts.append(f"(default: {shown})".replace("%", "%%"))
    return " ".join(parts)


def pick(args: argparse.Namespace, names) -> dict:
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def at_least(low: float, kind=int):
    """An argparse type: a `kind` number >= low, else argparse's one-line usage error (exit code 2)."""
    what = "an integer" if kind is int else "a number"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text}: expected {what} >= {low:g}")
        return value
    return convert
