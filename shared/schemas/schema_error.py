"""SchemaError (a payload does not match its schema, naming the field) and its making from msgspec's refusals.

msgspec refuses a payload with one line, such as "Expected `int` >= 0 - at `$.index`".
:func:`refusal` turns it into a SchemaError whose ``path`` is the field (``index``) and whose
message reads like the rest of our errors ("must be >= 0, got -1"), quoting the refused value
short: it is client input, which may be huge. A float refused for being NaN or infinite says
so ("must be finite"), and a value outside a ``Literal`` lists the allowed ones.
:func:`lone_surrogate` finds the string that msgspec's encoder refused for holding a lone
surrogate (only a JSON ``\\ud800`` escape makes one).
"""

from __future__ import annotations

import ast
import math
import re
import reprlib
from typing import Any

import msgspec
import msgspec.inspect as mi

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80

_AT = re.compile(r" - at `(?P<at>[^`]*)`(?: in `(?P<parent>[^`]*)`)?$")
_NAMED_FIELD = re.compile(r"Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`")
_BOUND = re.compile(r"Expected `\w+` (?P<op>[<>]=?) (?P<bound>\S+)")
_LENGTH = re.compile(r"Expected `\w+` of length (?P<op>[<>]=?) (?P<bound>\d+)")
_PATTERN = re.compile(r"Expected `str` matching regex (?P<regex>'.*')")
_CHOICE = re.compile(r"Invalid enum value .*")
_ANCHORED = re.compile(r"\^\(\?:(?P<inner>.*)\)\\Z")  # names.whole()
_STEP = re.compile(r"\.(?P<field>[^.\[]+)|\[(?P<index>\d+)\]")


class SchemaError(ValueError):
    """A payload does not match its schema.

    ``code`` is ``bad_payload`` or ``unsupported_version``; ``path`` names the field.
    """

    def __init__(self, message: str, path: str = "", code: str = "bad_payload") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.code = code


def shown(value: Any) -> str:
    """A short repr of a refused value."""
    return _SHOWN.repr(value)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def field_path(path: str, name: str) -> str:
    """The path of ``name`` inside ``path`` (``name`` may be an index, ``[0]``)."""
    if not path or name.startswith("["):
        return f"{path}{name}"
    return f"{path}.{name}" if name else path


def refusal(exc: msgspec.ValidationError, body: Any, target: Any, prefix: str = "") -> SchemaError:
    """The SchemaError for msgspec's refusal ``exc`` of ``body`` (the payload as plain data) as a
    ``target`` (the Struct type), its path under ``prefix``."""
    text = str(exc)
    at = _AT.search(text)
    message = text[:at.start()] if at else text
    where = (at["parent"] or at["at"]) if at else "$"
    path = field_path(prefix, where.removeprefix("$").removeprefix("."))
    named = _NAMED_FIELD.fullmatch(message)
    if named:
        missing = named["what"] == "missing required"
        return SchemaError("required field is missing" if missing else "unknown field", field_path(path, named["name"]))
    found, value = _value_at(body, where)
    got = f", got {shown(value)}" if found else ""
    if found and isinstance(value, float) and not math.isfinite(value):
        return SchemaError(f"must be finite{got}", path)
    if _CHOICE.fullmatch(message):
        return SchemaError(f"must be one of {', '.join(_choices(target, where))}{got}", path)
    return SchemaError(_reworded(message, got, len(value) if isinstance(value, (str, list)) else None), path)


def _reworded(message: str, got: str, length: int | None) -> str:
    """msgspec's ``message`` in our words."""
    if match := _BOUND.fullmatch(message):
        return f"must be {match['op']} {match['bound']}{got}"
    if match := _LENGTH.fullmatch(message):
        return f"length must be {match['op']} {match['bound']}" + (f", got {length}" if length is not None else "")
    if match := _PATTERN.fullmatch(message):
        regex = ast.literal_eval(match["regex"])
        anchored = _ANCHORED.fullmatch(regex)
        return f"must match {anchored['inner'] if anchored else regex}{got}"
    return message[:1].lower() + message[1:].replace("`", "")


def _choices(target: Any, where: str) -> tuple:
    """The values the ``Literal`` at ``where`` in ``target`` allows (msgspec's refusal does not list them)."""
    info = mi.type_info(target)
    for step in _STEP.finditer(where.removeprefix("$")):
        info = _inner(info, step["field"])
    return next((a.values for a in _alternatives(info) if isinstance(a, mi.LiteralType)), ())


def _inner(info: mi.Type, field: str | None) -> mi.Type:
    """The type one step below ``info``: its field ``field``, or (None) its list's items."""
    for alternative in _alternatives(info):
        if field is not None and isinstance(alternative, mi.StructType):
            return next((f.type for f in alternative.fields if f.encode_name == field), mi.AnyType())
        if field is None and isinstance(alternative, mi.ListType):
            return alternative.item_type
    return mi.AnyType()


def _alternatives(info: mi.Type) -> tuple[mi.Type, ...]:
    return info.types if isinstance(info, mi.UnionType) else (info,)


def _value_at(body: Any, where: str) -> tuple[bool, Any]:
    """(found, value) at msgspec's path ``where`` ("$.messages[0].role") in plain data."""
    value = body
    for step in _STEP.finditer(where.removeprefix("$")):
        if step["field"] is not None and isinstance(value, dict) and step["field"] in value:
            value = value[step["field"]]
        elif step["index"] is not None and isinstance(value, list) and int(step["index"]) < len(value):
            value = value[int(step["index"])]
        else:
            return False, None
    return True, value


def lone_surrogate(value: Any, path: str = "") -> SchemaError | None:
    """The SchemaError for the first string in ``value`` (plain data) holding a lone surrogate,
    which no encoder, tokenizer or msgpack packer downstream accepts; None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return SchemaError(f"holds a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}, "
                               "which is not valid Unicode text", path)
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        error = lone_surrogate(item, field_path(path, f"[{key}]" if isinstance(key, int) else str(key)))
        if error is not None:
            return error
    return None
