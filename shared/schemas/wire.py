"""The wire format every CaraServe message shares: msgpack maps decoded by msgspec into typed Structs.

A message is a :class:`Message`, a ``msgspec.Struct`` whose fields are its map's keys, plus an
envelope: ``kind`` (the class's ``KIND``, msgspec's tag; optional on receipt, checked when
present) and ``v`` (the schema version; a missing ``v`` means this version, another gets
``unsupported_version``). Nested structures derive from :class:`Struct`: plain maps, no envelope.

msgspec validates on receipt, in C, from the annotations: exact types (strict: a bool is not an
int, a string is valid UTF-8), required fields, unknown fields (refused), and the bounds, lengths,
choices (``Literal``) and patterns that ``Annotated[..., msgspec.Meta(...)]`` declares. Floats
are finite: every float field has both bounds, which NaN and infinity fail. Cross-field rules live
in ``check()``, run after decoding (not on construction: a service may build a chunk in steps).
Any violation raises :class:`SchemaError` naming the field. Validation follows the declared shape,
so a value nested deeper than its field's type is refused at the first level that does not match.

Only None-valued fields are left off the wire (``omit_defaults``, with None as their default);
every other default is given with :func:`default`, which msgspec always sends.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import msgpack
import msgspec
from msgspec import Meta

from shared.schemas.schema_error import SchemaError, lone_surrogate, refusal, shown, type_name

SCHEMA_VERSION = 1
FLOAT_MAX = sys.float_info.max  # the upper bound of a float field with none of its own: refuses inf and NaN

NonNegativeInt = Annotated[int, Meta(ge=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0, le=FLOAT_MAX)]

T = TypeVar("T", bound="Struct")
M = TypeVar("M", bound="Message")

_ENCODER = msgspec.msgpack.Encoder()
_REFUSED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)  # ValidationError is a DecodeError


def default(value: Any) -> Any:
    """A field default that is sent on the wire like any other value (a plain default would be left off)."""
    if isinstance(value, list):
        return msgspec.field(default_factory=lambda: list(value))
    return msgspec.field(default_factory=lambda: value)


class Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A nested wire structure: a msgpack map of validated fields, without an envelope."""

    def check(self, path: str = "") -> None:
        """Cross-field rules; subclasses raise SchemaError (and check the structures they hold)."""

    @classmethod
    def from_dict(cls: type[T], data: Any, path: str = "") -> T:
        """Validate plain data (a decoded JSON body, say) and build the structure; SchemaError on any violation."""
        try:
            value = msgspec.convert(data, cls)
            _ENCODER.encode(value)  # refuses a lone surrogate, which Python strings may hold
        except msgspec.ValidationError as exc:
            raise refusal(exc, data, cls, path) from None
        except UnicodeEncodeError:
            raise lone_surrogate(data, path) or SchemaError("holds a lone surrogate", path) from None
        value.check(path)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The structure as plain data (None-valued fields left out)."""
        return {name: msgspec.to_builtins(value) for name in self.__struct_fields__
                if (value := getattr(self, name)) is not None}


class _Envelope(msgspec.StructMeta):
    """Makes a message class's ``KIND`` its msgspec tag: the ``kind`` key on the wire."""

    def __new__(mcls, name: str, bases: tuple, namespace: dict, **kwargs: Any) -> Any:
        if "KIND" in namespace:
            kwargs["tag"] = namespace["KIND"]
        return super().__new__(mcls, name, bases, namespace, **kwargs)


class Message(Struct, metaclass=_Envelope, kw_only=True, tag_field="kind"):
    """A top-level wire message: a Struct plus the ``v``/``kind`` envelope."""

    KIND: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    v: Literal[SCHEMA_VERSION] = default(SCHEMA_VERSION)

    def encode(self) -> bytes:
        """msgpack bytes of this message with its envelope."""
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Parse and validate ``data``; SchemaError if it is not a valid ``cls`` message."""
        try:
            message = _decoder(cls).decode(data)
        except _REFUSED as exc:
            raise _explained(cls, data, exc) from None
        message.check()
        return message

    @classmethod
    def from_envelope(cls: type[M], body: Any) -> M:
        """Validate an envelope map as plain data (a decoded JSON body, say) as a ``cls`` message."""
        if not isinstance(body, dict):
            raise SchemaError(f"expected map, got {type_name(body)}")
        envelope_error = _envelope_error(cls, body)
        if envelope_error is not None:
            raise envelope_error
        return cls.from_dict(body)


def decode_one_of(data: bytes, first: type[Message], *others: type[Message]) -> Message:
    """Decode ``data`` as whichever of the message classes its ``kind`` names (a tagged union);
    a payload without ``kind`` is a ``first``."""
    try:
        message = _decoder(Union[(first, *others)]).decode(data)
    except _REFUSED:
        kind = _kind_of(data)
        return next((cls for cls in others if cls.KIND == kind), first).decode(data)  # says what is wrong
    message.check()
    return message


def unpack(data: bytes) -> dict[str, Any]:
    """Unpack msgpack ``data`` that must hold one map (of any content); SchemaError otherwise.

    This is what says why a payload is not even a message, the first thing a refusal names, so
    it keeps msgpack's strict unpacker: strings are strict UTF-8 (no lone surrogate), map keys
    are strings, integers fit in 64 bits, and nesting is bounded by the unpacker's fixed stack.
    """
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.StackError:
        raise SchemaError("not a msgpack map: nested too deeply") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(f"not a msgpack map: {exc}") from None
    if not isinstance(body, dict):
        raise SchemaError(f"expected a msgpack map, got {type_name(body)}")
    return body


@functools.cache
def _decoder(tp: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(tp)


def _kind_of(data: bytes) -> Any:
    try:
        return unpack(data).get("kind")
    except SchemaError:
        return None


def _explained(cls: type[Message], data: bytes, exc: Exception) -> SchemaError:
    """Why ``data`` is not a ``cls`` message, in the order a reader checks it: msgpack, a map,
    the envelope, then the fields (msgspec's ``exc``)."""
    try:
        body = unpack(data)
    except SchemaError as error:
        return error
    envelope_error = _envelope_error(cls, body)
    if envelope_error is not None:
        return envelope_error
    if isinstance(exc, msgspec.ValidationError):
        return refusal(exc, body, cls)
    return SchemaError(f"not a {cls.KIND!r} message: {exc}")


def _envelope_error(cls: type[Message], body: dict[str, Any]) -> SchemaError | None:
    version = body.get("v", cls.SCHEMA_VERSION)
    if type(version) is not int or version != cls.SCHEMA_VERSION:
        return SchemaError(f"unsupported schema version {shown(version)}, this service speaks {cls.SCHEMA_VERSION}",
                           "v", code="unsupported_version")
    kind = body.get("kind", cls.KIND)
    if kind != cls.KIND:
        return SchemaError(f"expected a {cls.KIND!r} message, got {shown(kind)}", "kind")
    return None
