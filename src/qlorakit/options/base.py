"""What every command's option model shares: how a field is declared, how its flag is spelt, what it allows in
words, and the one-line error for a value it does not allow.

A command's options are a frozen pydantic model whose fields are its flags (options/flags.py turns one into argparse
arguments). Building one, from the command line or from Python, checks every value; a value a field does not allow
raises OptionValueError naming the flag, e.g. `--max-new-tokens 0: allowed an integer >= 1`.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from ..errors import OptionValueError

_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def option(default: Any = ..., description: str = "", *, metavar: str | None = None, positional: bool = False,
           note: str | None = None, off: str | None = None, **constraints: Any) -> Any:
    """A field of a command's options. `default` omitted: required. `description` is the help text. `metavar` is
    the flag's value placeholder in --help, `positional` makes it an argument without dashes, `note` says what a
    special value means (e.g. '0: greedy'; shown with the allowed values), `off` what the --no-x flag of a boolean
    that is on by default does. `constraints` are pydantic's (ge, gt, le, lt, allow_inf_nan)."""
    given = (("metavar", metavar), ("positional", positional), ("note", note), ("off", off))
    extra = {key: value for key, value in given if value}
    return Field(default, description=description, json_schema_extra=extra or None, **constraints)


def extra(field: FieldInfo, key: str) -> Any:
    """metavar, positional, note or off of a field declared with option(); None when not given."""
    data = field.json_schema_extra
    return data.get(key) if isinstance(data, dict) else None


def value_type(field: FieldInfo) -> Any:
    """The field's type without `| None`: int, float, str, bool, list[str] or a Literal."""
    annotation = field.annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        kept = [a for a in get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def choices(field: FieldInfo) -> tuple[Any, ...] | None:
    """The values a Literal field allows, in order; None for any other field."""
    kind = value_type(field)
    return get_args(kind) if get_origin(kind) is Literal else None


def is_switch_off(field: FieldInfo) -> bool:
    """A boolean that is on by default: its flag (--no-x) turns it off."""
    return value_type(field) is bool and field.default is True


def flag(name: str, field: FieldInfo) -> str:
    """The command-line spelling of a field: `model_dir` (positional), `--max-new-tokens`, `--no-chat-template`
    (a boolean that is on by default)."""
    if extra(field, "positional"):
        return name
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if is_switch_off(field) else f"--{dashed}"


def allowed(field: FieldInfo, with_note: bool = True) -> str:
    """What a field allows, in words: 'an integer >= 1', 'a finite number >= 0 (0: greedy)', 'a number > 0 and
    <= 1', '0 to 65535 (0: any free port)', "one of 'nf4', 'fp4'"; with_note False leaves out the note."""
    kind = value_type(field)
    bounds = [(sign, getattr(m, attr)) for m in field.metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]
    bounds.sort(key=lambda bound: bound[0] not in (">=", ">"))  # the lower bound first
    if choices(field) is not None:
        text = "one of " + ", ".join(repr(c) for c in choices(field))
    elif kind is bool:
        text = "true or false"
    elif kind is int and [s for s, _ in bounds] == [">=", "<="]:
        text = f"{bounds[0][1]} to {bounds[1][1]}"
    elif kind in (int, float):
        finite = any(getattr(m, "allow_inf_nan", True) is False for m in field.metadata)
        noun = "an integer" if kind is int else "a finite number" if finite else "a number"
        text = " and ".join([noun + (f" {bounds[0][0]} {bounds[0][1]:g}" if bounds else "")] +
                            [f"{sign} {value:g}" for sign, value in bounds[1:]])
    elif get_origin(kind) is list:
        text = "a list of strings"
    else:
        text = "a string"
    note = extra(field, "note") if with_note else None
    return f"{text} ({note})" if note else text


def error_line(model: type[BaseModel], err: ValidationError) -> str:
    """One line for a ValidationError of a command's options, naming each flag, the value and what it allows."""
    lines = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        field = model.model_fields.get(name)
        if not name:
            lines.append(e["msg"].removeprefix("Value error, "))
        elif field is None:
            known = list(model.model_fields)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown option {name!r}{hint} (allowed: {', '.join(known)})")
        elif e["type"] == "missing":
            lines.append(f"{flag(name, field)}: required")
        elif e["type"] == "value_error":
            lines.append(f"{flag(name, field)} {e['input']!r}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{flag(name, field)} {e['input']!r}: allowed {allowed(field)}")
    return "; ".join(lines)


class CommandOptions(BaseModel):
    """The options of one command. Values are checked when it is built, and it cannot be changed afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, protected_namespaces=())

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise OptionValueError(error_line(type(self), err)) from None
