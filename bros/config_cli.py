"""Command-line flags from a frozen config dataclass: one --flag-name per field, typed
from its annotation, defaulting to the field's default. Shared by the services so each
keeps one config dataclass and the command line stays in step with it."""
from __future__ import annotations

import argparse
from dataclasses import fields

_KINDS = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        annotation = str(f.type).replace(" | None", "")
        if annotation == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif annotation in _KINDS:
            parser.add_argument(flag, type=_KINDS[annotation], default=default)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {f.type!r}; skip it and add one by hand")
