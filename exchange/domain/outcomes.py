"""Idempotent outcomes as stored: a domain result in canonical JSON, decoded back to the same value.

A write's outcome is kept for good with its idempotency record (DESIGN §2) so that a retry gets
the first answer. It is kept as the *domain* result — a frozen dataclass of plain values — not as
the bytes of a reply: the transaction never builds protobuf, and the edge encodes the result the
same way for the first answer and for every replay, so a replay's bytes are the first answer's.

The encoding is canonical (keys sorted, no whitespace, bytes as base64), so equal results have
equal bytes and the audit record can hash them. Decoding is driven by the dataclass's own type
hints; only registered types (`@outcomes.result`) are decoded, so a stored record can never name
an arbitrary class.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")
_TYPES: dict[str, type[Any]] = {}
_PLAIN = {"str": str, "int": int, "bool": bool}


def result(cls: type[T]) -> type[T]:
    """Register a dataclass as a storable outcome, under its module-qualified name."""
    assert dataclasses.is_dataclass(cls), f"{cls} is not a dataclass"
    _TYPES[_name(cls)] = cls
    return cls


def _name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_FIELDS: dict[type[Any], tuple[str, ...]] = {}  # a dataclass's field names, read once (hot path)


def _field_names(cls: type[Any]) -> tuple[str, ...] | None:
    names = _FIELDS.get(cls)
    if names is None and dataclasses.is_dataclass(cls):
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_SCALARS = frozenset({str, int, bool, type(None)})
# Keys sorted, no whitespace, UTF-8: equal results have equal bytes. Built once (hot path).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> Any:
    """The JSON-ready form of a value: a dataclass's fields by name (in field order), bytes as base64."""
    cls = type(value)
    if cls in _SCALARS:
        return value
    if _field_names(cls) is not None:
        # A frozen dataclass's __dict__ holds exactly its fields, in order: read once, not per name.
        return {name: field if type(field) in _SCALARS else _plain(field) for name, field in vars(value).items()}
    if cls is bytes:
        return base64.b64encode(value).decode("ascii")
    if cls is list or cls is tuple:
        return [_plain(v) for v in value]
    if cls is dict:
        return {str(k): _plain(v) for k, v in value.items()}
    raise AssertionError(f"{cls.__name__} is not storable")


def encode(outcome: Any) -> bytes:
    """The canonical bytes of a registered result (or of a plain str/int/bool)."""
    if isinstance(outcome, str | int | bool) and type(outcome).__name__ in _PLAIN:
        kind = type(outcome).__name__
    else:
        kind = _name(type(outcome))
        assert kind in _TYPES, f"{kind} is not registered as an outcome (@outcomes.result)"
    return _CANONICAL.encode({"type": kind, "value": _plain(outcome)}).encode()


def _build(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        assert len(options) == 1, f"ambiguous union {hint}"
        return _build(options[0], value)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        built = [_build(item, v) for v in value]
        return built if origin is list else tuple(built)
    if origin is dict:
        _key, item = typing.get_args(hint)
        return {k: _build(item, v) for k, v in value.items()}
    if hint is bytes:
        return base64.b64decode(value)
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value)
    if hint is int:
        return int(value)
    return value


_HINTS: dict[type[Any], tuple[tuple[str, Any], ...]] = {}  # (field, type hint) of each init field, read once


def _dataclass(cls: Any, value: dict[str, Any]) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = _HINTS[cls] = tuple((f.name, resolved[f.name]) for f in dataclasses.fields(cls) if f.init)
    return cls(**{name: _build(hint, value[name]) for name, hint in hints})


def decode(data: bytes) -> Any:
    """The result `encode` stored; a type never registered is refused (a corrupt or foreign record)."""
    document = json.loads(data)
    kind = document["type"]
    if kind in _PLAIN:
        return _PLAIN[kind](document["value"])
    cls = _TYPES.get(kind)
    if cls is None:
        raise ValueError(f"stored outcome of unknown type {kind!r}")
    return _dataclass(cls, document["value"])


@dataclasses.dataclass(frozen=True)
class LegacyReply:
    """An outcome stored before outcomes were domain results: the reply's bytes, served as stored."""

    raw: bytes
