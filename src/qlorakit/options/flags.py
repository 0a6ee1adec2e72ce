"""A command's argparse arguments generated from its option model (options/commands.py), and the parsed
arguments read back into that model. A field is a flag named after it (`max_new_tokens` -> `--max-new-tokens`,
`chat_template: bool = True` -> `--no-chat-template`), with the field's default, its Literal values as choices and
its description as help, so a flag cannot exist without a field nor differ from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, get_origin

from pydantic.fields import FieldInfo

from .base import CommandOptions, allowed, choices, extra, flag, is_switch_off, value_type


def _number(kind: type) -> Callable[[str], Any]:
    """argparse's `type` for an int or float flag. Text that is not a number is passed on as it is, so that the
    model refuses it in the same one line as a number out of range, naming the flag and what it allows."""
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


def _shown(field: FieldInfo) -> str:
    return repr(field.default) if value_type(field) is str else str(field.default)


def help_text(field: FieldInfo) -> str:
    """The field's description, with what it allows (numbers) and its default, as --help shows it."""
    text = field.description or ""
    if is_switch_off(field):
        off = extra(field, "off")
        text = f"{off} (default: {text})" if off else f"turn off: {text}"
    elif not field.is_required() and field.default is not None and field.default is not False:
        kind = value_type(field)
        if kind in (int, float):
            note = extra(field, "note")
            text += f" ({allowed(field, with_note=False)}{', ' + note if note else ''}; default: {_shown(field)})"
        else:
            text += f" (default: {_shown(field)})"
    return text.replace("%", "%%")


def _argument(name: str, field: FieldInfo) -> tuple[list[str], dict[str, Any]]:
    """add_argument's names and keywords for one field."""
    kind = value_type(field)
    kwargs: dict[str, Any] = {"help": help_text(field)}
    if extra(field, "metavar"):
        kwargs["metavar"] = extra(field, "metavar")
    if kind in (int, float):
        kwargs["type"] = _number(kind)
    if choices(field) is not None:
        kwargs["choices"] = choices(field)
    if extra(field, "positional"):
        return [name], kwargs
    kwargs["dest"] = name
    if field.is_required():
        kwargs["required"] = True
    else:
        kwargs["default"] = field.default
    if kind is bool:
        kwargs["action"] = "store_false" if is_switch_off(field) else "store_true"
    elif get_origin(kind) is list:
        kwargs["action"] = "append"
    return [flag(name, field)], kwargs


def add_flags(parser: argparse.ArgumentParser, options: type[CommandOptions]) -> None:
    """One argument of `parser` per field of `options`, in the fields' order."""
    for name, field in options.model_fields.items():
        names, kwargs = _argument(name, field)
        parser.add_argument(*names, **kwargs)


def read_flags(options: type[CommandOptions], args: argparse.Namespace) -> CommandOptions:
    """The parsed arguments of a command built by add_flags, as its options; OptionValueError (one line naming
    the flag) for a value the model does not allow."""
    return options(**{name: getattr(args, name) for name in options.model_fields})
