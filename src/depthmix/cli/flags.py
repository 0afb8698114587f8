"""Command-line flags generated from dataclasses, so options and configs are declared once."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re


from ..config import ConfigError, parse_value


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
                        choices: dict[str, str] | None = None) -> list[str]:
    """One --flag per field (dashes for underscores), default SUPPRESS so that unset flags stay unset; its help
    is the field's entry in the class docstring, its default and `choices[name]` (listed, not enforced here:
    the dataclass's validation says what is wrong with a value)."""
    target = parser.add_argument_group(group) if group else parser
    docs = field_docs(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f.type)
        text = _help(docs.get(f.name, ""), f, (choices or {}).get(f.name))
        shared = next((a for a in parser._actions if flag in a.option_strings), None)
        if shared is not None:  # already declared by another dataclass (e.g. `layers`): one flag, both meanings
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


def field_docs(cls) -> dict[str, str]:
    """The `name: text` entries of a dataclass docstring (continuation lines indented under them)."""
    docs: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        entry = re.match(r"(\w+): (.*)", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _help(text: str, f: dataclasses.Field, choices: str | None) -> str:
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


def build_dataclass(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}")
    return cls(**values)
