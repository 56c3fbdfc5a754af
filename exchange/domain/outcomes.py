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


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    assert value is None or isinstance(value, str | int | bool), f"{type(value).__name__} is not storable"
    return value


def encode(outcome: Any) -> bytes:
    """The canonical bytes of a registered result (or of a plain str/int/bool)."""
    if isinstance(outcome, str | int | bool) and type(outcome).__name__ in _PLAIN:
        kind = type(outcome).__name__
    else:
        kind = _name(type(outcome))
        assert kind in _TYPES, f"{kind} is not registered as an outcome (@outcomes.result)"
    document = {"type": kind, "value": _plain(outcome)}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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


def _dataclass(cls: Any, value: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(cls) if f.init})


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
