"""Command-line options declared once, on the config dataclass fields they fill.

A config field carries an `Option` in its metadata: its flag, help, choices, and when it has an effect. From
that one declaration `add_options` generates the argparse arguments, `config_from_args` builds the config from
what was given, and `refuse_inapplicable` rejects a flag that the chosen method or mode would ignore.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line."""

    flag: str                                   # "--rebuild-ratio"; "" for a field with no flag
    help: str
    type: Callable | None = None                # argparse type; None: str (or a switch for bool fields)
    choices: tuple | None = None
    required: bool = False
    metavar: str | None = None
    negatable: bool = False                     # bool field: --x / --no-x
    applies: Callable[[Any], bool] | None = None  # whether the field has an effect for this config
    applies_to: str = ""                        # says when it has an effect, for the refusal message


def option(default, flag: str, help: str, **kw) -> Field:
    """A dataclass field with its command-line option."""
    return field(default=default, metadata={"option": Option(flag, help, **kw)})


def _option(f: Field) -> Option | None:
    return f.metadata.get("option")


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_options(parser: argparse.ArgumentParser, cls, flags: dict[str, str] | None = None,
                skip: tuple[str, ...] = ()) -> None:
    """Add an argument for every optioned field of `cls` (its flag renamed by `flags`, fields in `skip` left
    out). Nothing given means absent from the namespace, so a config can tell given from defaulted."""
    flags = flags or {}
    own = set(cls.__dict__.get("__annotations__", ()))
    for f in sorted(fields(cls), key=lambda f: f.name not in own):   # the command's own options first
        opt = _option(f)
        if opt is None or not opt.flag or f.name in skip:
            continue
        flag = flags.get(f.name, opt.flag)
        default = _default(f)
        text = opt.help
        if default is not MISSING and not opt.required and "default" not in text:
            text += f" (default {'on' if default is True else 'off' if default is False else default})"
        kw: dict[str, Any] = dict(dest=f.name, help=text.replace("%", "%%"), default=argparse.SUPPRESS)
        if f.type in ("bool", bool, "bool | None"):   # None: decided later (e.g. --streaming's default)
            kw["action"] = argparse.BooleanOptionalAction if opt.negatable else "store_true"
        else:
            kw.update(type=opt.type or str, choices=opt.choices, required=opt.required, metavar=opt.metavar)
        parser.add_argument(flag, **kw)


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """Build `cls` from the parsed options it declares (plus `fixed` values); returns (config, given), where
    `given` names the fields whose flags were on the command line."""
    names = {f.name for f in fields(cls)}
    given = {k for k in vars(args) if k in names and _option_of(cls, k) is not None}
    values = {k: getattr(args, k) for k in given}
    return cls(**values, **fixed), given


def _option_of(cls, name: str) -> Option | None:
    return next((_option(f) for f in fields(cls) if f.name == name), None)


def flag_of(cls, name: str, flags: dict[str, str] | None = None) -> str:
    opt = _option_of(cls, name)
    return (flags or {}).get(name) or (opt.flag if opt and opt.flag else name)


def refuse_inapplicable(cfg, given: set[str] | None, flags: dict[str, str] | None = None) -> None:
    """Refuse a given option that has no effect for `cfg` (e.g. --rebuild-ratio with Wanda). `given`: the fields
    set on the command line; None (the Python API) checks nothing, since defaults cannot be told apart there."""
    if not given:
        return
    for f in fields(cfg):
        opt = _option(f)
        if opt is None or opt.applies is None or f.name not in given or opt.applies(cfg):
            continue
        raise ConfigError(f"{flag_of(type(cfg), f.name, flags)} has no effect here: it applies {opt.applies_to}")
