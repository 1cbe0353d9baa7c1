"""Typed configuration: one dataclass per concern, CLI flags generated from it.

Every config dataclass documents each field with ``field(metadata={"help": ...})``
(use :func:`option`) and validates itself in ``__post_init__`` by raising
:class:`ConfigError`. :func:`add_arguments` turns a dataclass into argparse flags
(``max_batch_size`` -> ``--max-batch-size``) and :func:`from_namespace` builds the
dataclass back from parsed arguments, so flags are never written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None,
           default_factory: Any = dataclasses.MISSING, cli: bool = True) -> Any:
    """A dataclass field with a one-line help text (and optional choices) for the CLI."""
    meta = {"help": help, "choices": choices, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    require(value in choices, f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _flag(name: str, prefix: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """Return (python type, optional?) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per CLI-visible field of dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        tp, _ = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default,
                                  "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(tp)[0] if typing.get_args(tp) else str
        else:
            kwargs["type"] = tp
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name, prefix), **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """Build dataclass ``cls`` from parsed flags (plus explicit ``overrides``)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = prefix + f.name
        if hasattr(ns, key) and getattr(ns, key) is not None:
            value = getattr(ns, key)
            if isinstance(value, list) and f.type in ("tuple", tuple) or str(f.type).startswith("tuple"):
                value = tuple(value) if isinstance(value, list) else value
            values[f.name] = value
    values.update(overrides)
    return cls(**values)  # type: ignore[call-arg]


def from_env(cls: type[T], environ: typing.Mapping[str, str], prefix: str = "CARASERVE_") -> T:
    """Build dataclass ``cls`` from ``PREFIX_FIELD`` environment variables (docker-compose)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        tp, _ = _scalar_type(hints[f.name])
        if tp is bool:
            values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            values[f.name] = tuple(inner(v) for v in raw.split(",") if v)
        else:
            values[f.name] = tp(raw)
    return cls(**values)  # type: ignore[call-arg]
