"""The wire format every CaraServe message shares: msgpack maps validated against dataclasses.

A message is a dataclass deriving from :class:`Message`. On the wire it is one msgpack map
holding its fields plus an envelope: ``v`` (the schema version, required) and ``kind``
(the message name; optional on receipt, checked when present). Nested structures derive
from :class:`Struct` and are plain maps without an envelope.

Validation on receipt is strict and driven by the field annotations: exact types (a bool is
not an int, a float must be finite, a string must be valid Unicode: no lone surrogate),
required fields, unknown fields, and the ranges, lengths, choices and patterns declared with
:func:`spec`. Any violation raises :class:`SchemaError` naming the offending field. Cross-field
rules live in ``check()``. Validation walks only the declared shape, so a value nested deeper
than its field's type is refused at the first level that does not match.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from typing import Any, Callable, ClassVar, TypeVar

import msgpack

SCHEMA_VERSION = 1

T = TypeVar("T", bound="Struct")
Validator = Callable[[Any, str], Any]


class SchemaError(ValueError):
    """A payload does not match its schema.

    ``code`` is ``bad_payload`` or ``unsupported_version``; ``path`` names the field.
    """

    def __init__(self, message: str, path: str = "", code: str = "bad_payload") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.code = code


def spec(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
         ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, choices: tuple | None = None, min_len: int | None = None,
         max_len: int | None = None, pattern: str | None = None) -> Any:
    """A message field with receipt-time constraints.

    ``ge``/``gt``/``le``/``lt`` bound numbers, ``min_len``/``max_len`` bound strings and
    lists, ``choices`` and ``pattern`` (a full-match regex) restrict strings. On a list
    field, the length bounds apply to the list and the other constraints to its items.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "min_len": min_len,
            "max_len": max_len, "pattern": re.compile(pattern) if pattern else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80


def _shown(value: Any) -> str:
    """A short repr of a refused value: error messages quote client input, which may be huge."""
    return _SHOWN.repr(value)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_BOUNDS = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))


def _number_checker(meta: dict) -> Callable[[float, str], None]:
    """A check of the numeric bounds ``meta`` declares (built once per field, run per value)."""
    bounds = [(ok, meta[key], word) for key, ok, word in _BOUNDS if meta.get(key) is not None]

    def check_number(value: float, path: str) -> None:
        for ok, bound, word in bounds:
            if not ok(value, bound):
                raise SchemaError(f"must be {word} {bound}, got {_shown(value)}", path)
    return check_number


def _check_sized(value: str | list, meta: dict, path: str) -> None:
    if meta.get("min_len") is not None and len(value) < meta["min_len"]:
        raise SchemaError(f"length must be >= {meta['min_len']}, got {len(value)}", path)
    if meta.get("max_len") is not None and len(value) > meta["max_len"]:
        raise SchemaError(f"length must be <= {meta['max_len']}, got {len(value)}", path)


def _scalar_validator(tp: type, meta: dict) -> Validator:
    if tp is bool:
        def check_bool(value: Any, path: str) -> bool:
            if not isinstance(value, bool):
                raise SchemaError(f"expected bool, got {_type_name(value)}", path)
            return value
        return check_bool
    if tp is int:
        check_int_bounds = _number_checker(meta)

        def check_int(value: Any, path: str) -> int:
            if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
                raise SchemaError(f"expected int, got {_type_name(value)}", path)
            check_int_bounds(value, path)
            return value
        return check_int
    if tp is float:
        check_float_bounds = _number_checker(meta)

        def check_float(value: Any, path: str) -> float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SchemaError(f"expected number, got {_type_name(value)}", path)
            if not math.isfinite(value):
                raise SchemaError(f"must be finite, got {_shown(value)}", path)
            check_float_bounds(value, path)
            return float(value)
        return check_float
    if tp is str:
        return _str_validator(meta)
    raise TypeError(f"unsupported wire type {tp!r}")


def _check_unicode(value: str, path: str) -> None:
    """Refuse a lone surrogate (only a JSON ``\\ud800`` escape makes one): no encoder, tokenizer
    or msgpack packer downstream accepts it. ASCII strings, the common case, cost nothing; others
    one pass of the UTF-8 codec, which fails exactly on surrogates."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SchemaError(f"holds a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}, "
                          "which is not valid Unicode text", path) from None


def _str_validator(meta: dict) -> Validator:
    sized = meta.get("min_len") is not None or meta.get("max_len") is not None
    choices, pattern = meta.get("choices"), meta.get("pattern")

    def check_str(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"expected string, got {_type_name(value)}", path)
        _check_unicode(value, path)
        if sized:
            _check_sized(value, meta, path)
        if choices and value not in choices:
            raise SchemaError(f"must be one of {', '.join(choices)}, got {_shown(value)}", path)
        if pattern is not None and not pattern.fullmatch(value):
            raise SchemaError(f"must match {pattern.pattern}, got {_shown(value)}", path)
        return value
    return check_str


def _list_validator(tp: Any, meta: dict) -> Validator:
    args = typing.get_args(tp)
    if not args:
        raise TypeError(f"list field needs an item type, got {tp!r}")
    item_meta = {k: v for k, v in meta.items() if k not in ("min_len", "max_len")}
    item = _validator(args[0], item_meta)
    ints = args[0] is int

    def check_list(value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise SchemaError(f"expected list, got {_type_name(value)}", path)
        _check_sized(value, meta, path)
        if ints and _plain_ints_in_range(value, item_meta):
            return value
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return check_list


def _plain_ints_in_range(value: list, meta: dict) -> bool:
    """Fast path for token-id lists: all items are ints within the bounds (bools excluded)."""
    if not value:
        return True
    if not all(type(v) is int for v in value):
        return False
    low, high = min(value), max(value)
    return ((meta.get("ge") is None or low >= meta["ge"]) and (meta.get("gt") is None or low > meta["gt"])
            and (meta.get("le") is None or high <= meta["le"]) and (meta.get("lt") is None or high < meta["lt"]))


def _outer_type(tp: Any) -> type:
    """The python type a decoded value of annotation ``tp`` has before item checks."""
    origin = typing.get_origin(tp)
    if origin is list:
        return list
    if isinstance(tp, type) and issubclass(tp, Struct):
        return dict
    return tp


def _union_validator(tp: Any, meta: dict) -> Validator:
    args = typing.get_args(tp)
    optional = type(None) in args
    alternatives = [(_outer_type(a), _validator(a, meta)) for a in args if a is not type(None)]
    names = " or ".join(getattr(t, "__name__", str(t)) for t, _ in alternatives)

    def check_union(value: Any, path: str) -> Any:
        if value is None:
            if optional:
                return None
            raise SchemaError("must not be null", path)
        for outer, check in alternatives:
            if outer is float and isinstance(value, int) and not isinstance(value, bool):
                return check(value, path)
            if isinstance(value, outer) and not (outer is int and isinstance(value, bool)):
                return check(value, path)
        raise SchemaError(f"expected {names}, got {_type_name(value)}", path)
    return check_union


def _validator(tp: Any, meta: dict) -> Validator:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union_validator(tp, meta)
    if origin is list:
        return _list_validator(tp, meta)
    if isinstance(tp, type) and issubclass(tp, Struct):
        def check_struct(value: Any, path: str) -> Struct:
            return tp.from_dict(value, path)
        return check_struct
    return _scalar_validator(tp, meta)


@dataclasses.dataclass
class _FieldPlan:
    name: str
    check: Validator
    default: Any
    factory: Any
    nested: bool


class Struct:
    """A nested wire structure: a msgpack map of validated fields, without an envelope."""

    _plans: ClassVar[dict[type, list[_FieldPlan]]] = {}
    _known: ClassVar[dict[type, frozenset[str]]] = {}

    @classmethod
    def _plan(cls) -> list[_FieldPlan]:
        plan = Struct._plans.get(cls)
        if plan is None:
            hints = typing.get_type_hints(cls)
            plan = [_FieldPlan(f.name, _validator(hints[f.name], dict(f.metadata)), f.default,
                               f.default_factory, _holds_struct(hints[f.name]))
                    for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
            Struct._plans[cls] = plan
            Struct._known[cls] = frozenset(p.name for p in plan)
        return plan

    @classmethod
    def from_dict(cls: type[T], data: Any, path: str = "") -> T:
        """Validate a decoded map and build the structure; SchemaError on any violation."""
        if not isinstance(data, dict):
            raise SchemaError(f"expected map, got {_type_name(data)}", path)
        plan = cls._plan()
        if not Struct._known[cls].issuperset(data):
            key = next(k for k in data if k not in Struct._known[cls])
            raise SchemaError("unknown field", f"{path}.{key}" if path else str(key))
        values = {}
        for p in plan:
            if p.name in data:
                values[p.name] = p.check(data[p.name], f"{path}.{p.name}" if path else p.name)
            elif p.default is not dataclasses.MISSING:
                values[p.name] = p.default
            elif p.factory is not dataclasses.MISSING:
                values[p.name] = p.factory()
            else:
                raise SchemaError("required field is missing", f"{path}.{p.name}" if path else p.name)
        obj = cls(**values)
        obj.check(path)
        return obj

    def check(self, path: str = "") -> None:
        """Cross-field rules; subclasses raise SchemaError. Called after field validation."""

    def to_dict(self) -> dict[str, Any]:
        """The structure as a plain map (None-valued fields left out)."""
        out: dict[str, Any] = {}
        for p in self._plan():
            value = getattr(self, p.name)
            if value is None:
                continue
            if p.nested:
                value = _plain(value)
            out[p.name] = value
        return out


def _holds_struct(tp: Any) -> bool:
    if isinstance(tp, type):
        return issubclass(tp, Struct)
    return any(_holds_struct(a) for a in typing.get_args(tp))


def _plain(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


M = TypeVar("M", bound="Message")


class Message(Struct):
    """A top-level wire message: a Struct plus the ``v``/``kind`` envelope."""

    KIND: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    def encode(self) -> bytes:
        """msgpack bytes of this message with its envelope."""
        body = self.to_dict()
        body["v"] = self.SCHEMA_VERSION
        body["kind"] = self.KIND
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Parse and validate ``data``; SchemaError if it is not a valid ``cls`` message."""
        return cls.from_envelope(unpack(data))

    @classmethod
    def from_envelope(cls: type[M], body: dict[str, Any]) -> M:
        """Validate an unpacked envelope map (see :func:`unpack`) as a ``cls`` message.

        A missing ``v`` means this version (the README's examples leave it out); another
        version gets ``unsupported_version``.
        """
        body = dict(body)
        version = body.pop("v", cls.SCHEMA_VERSION)
        if version != cls.SCHEMA_VERSION:
            raise SchemaError(f"unsupported schema version {_shown(version)}, this service speaks "
                              f"{cls.SCHEMA_VERSION}", "v", code="unsupported_version")
        kind = body.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise SchemaError(f"expected a {cls.KIND!r} message, got {_shown(kind)}", "kind")
        return cls.from_dict(body)


def unpack(data: bytes) -> dict[str, Any]:
    """Unpack msgpack ``data`` that must hold one map; SchemaError otherwise.

    msgpack itself bounds what a hostile payload can make: strings must be strict UTF-8 (so no
    lone surrogate), integers fit in 64 bits, lengths are capped by the payload's size, and
    nesting by the unpacker's fixed stack (StackError past 1024 levels).
    """
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.StackError as exc:
        raise SchemaError("not a msgpack map: nested too deeply") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(f"not a msgpack map: {exc}") from exc
    if not isinstance(body, dict):
        raise SchemaError(f"expected a msgpack map, got {_type_name(body)}")
    return body


def kind_of(body: dict[str, Any]) -> str | None:
    """The ``kind`` of an unpacked envelope, if it names one."""
    kind = body.get("kind")
    return kind if isinstance(kind, str) else None
