"""Toxics: Toxiproxy's per-direction faults, as values (what each one does lives in _proxy).

Rules of this module:

1. A ``Toxic`` is a frozen value in Toxiproxy's JSON shape: ``name``, ``type``, ``stream``
   ("upstream": client to server, "downstream": server to client), ``toxicity`` (the
   probability, 0..1, that it applies to a given connection) and ``attributes`` (integers,
   in Toxiproxy's units: milliseconds, KB/s, bytes, microseconds for ``slicer.delay``).
   Changing a toxic makes a new value with a higher ``version``; a connection re-rolls its
   toxicity when the version changes, as Toxiproxy re-runs a toxic that is updated.
2. Validation happens here, once, and raises ``ToxicError`` with the HTTP status and the
   message Toxiproxy would answer (400 bad body / invalid type / invalid stream, 409 exists,
   404 not found), so the Python API and the HTTP API refuse the same things the same way.
3. Toxicity rolls are deterministic: ``rolls(seed, serial, toxic)`` depends only on the
   proxy's seed, the connection's serial number and the toxic's name and version, so a seeded
   run picks the same connections every time, whatever the timing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

# Toxiproxy's toxic types and their attributes with defaults (toxics/*.go in Shopify/toxiproxy).
TOXIC_TYPES: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},  # ms
    "bandwidth": {"rate": 0},  # KB/s (1 KB = 1000 bytes, as Toxiproxy computes it)
    "slow_close": {"delay": 0},  # ms
    "timeout": {"timeout": 0},  # ms; 0 = never close
    "reset_peer": {"timeout": 0},  # ms
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},  # bytes, bytes, µs
    "limit_data": {"bytes": 0},
}

STREAMS = ("upstream", "downstream")
# FaultProxy's older methods say "up" / "down"; both spellings are accepted everywhere.
_STREAM_ALIASES = {"up": "upstream", "down": "downstream",
                   "upstream": "upstream", "downstream": "downstream"}


class ToxicError(ValueError):
    """A refused toxic or proxy operation: ``status`` is the HTTP status Toxiproxy answers
    (400, 404 or 409) and ``str(exc)`` its message. Nothing was changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_stream(value: Any) -> str:
    """"upstream"/"downstream" (any case) or "up"/"down" -> "upstream"/"downstream"."""
    stream = _STREAM_ALIASES.get(str(value).lower()) if isinstance(value, str) else None
    if stream is None:
        raise ToxicError("stream was invalid, can be either upstream or downstream")
    return stream


def _int_attr(name: str, value: Any) -> int:
    # Toxiproxy's attributes are Go int64 fields: a float or a string is a bad request body.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToxicError(f"bad request body: attribute {name!r} must be an integer, "
                         f"got {value!r}")
    if value < 0:
        raise ToxicError(f"bad request body: attribute {name!r} must be >= 0, got {value!r}")
    return value


def _toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ToxicError(f"bad request body: toxicity must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Toxic:
    """One toxic on one stream of a proxy (see the module docstring)."""

    name: str
    type: str
    stream: str
    toxicity: float = 1.0
    attributes: dict[str, int] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def make(cls, type: str, *, name: str | None = None, stream: str = "downstream",
             toxicity: float = 1.0, attributes: dict[str, Any] | None = None,
             version: int = 0) -> Toxic:
        """Validate and build (Toxiproxy's defaults: downstream, toxicity 1, name
        ``{type}_{stream}``). Raises ToxicError (400) on a bad type, stream or attribute."""
        if type not in TOXIC_TYPES:
            raise ToxicError("invalid toxic type")
        stream = parse_stream(stream)
        attrs = dict(TOXIC_TYPES[type])
        for key, value in (attributes or {}).items():
            if key in attrs:  # unknown attributes are ignored, as Go's JSON decoder does
                attrs[key] = _int_attr(key, value)
        if name is not None and not isinstance(name, str):
            raise ToxicError(f"bad request body: name must be a string, got {name!r}")
        return cls(name or f"{type}_{stream}", type, stream, _toxicity(toxicity), attrs, version)

    def changed(self, toxicity: float | None = None,
                attributes: dict[str, Any] | None = None) -> Toxic:
        """A new version with some attributes and/or the toxicity changed (the rest kept)."""
        attrs = dict(self.attributes)
        for key, value in (attributes or {}).items():
            if key in attrs:
                attrs[key] = _int_attr(key, value)
        tox = self.toxicity if toxicity is None else _toxicity(toxicity)
        return replace(self, toxicity=tox, attributes=attrs, version=self.version + 1)

    def to_json(self) -> dict[str, Any]:
        """Toxiproxy's JSON shape of a toxic."""
        return {"attributes": dict(self.attributes), "name": self.name, "type": self.type,
                "stream": self.stream, "toxicity": self.toxicity}

    @classmethod
    def from_json(cls, body: Any) -> Toxic:
        """From a Toxiproxy ``POST /proxies/{proxy}/toxics`` body. Raises ToxicError (400)."""
        if not isinstance(body, dict):
            raise ToxicError("bad request body: a JSON object is expected")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ToxicError("bad request body: attributes must be an object")
        return cls.make(body.get("type", ""), name=body.get("name") or None,
                        stream=body.get("stream", "downstream"),
                        toxicity=body.get("toxicity", 1.0), attributes=attributes)


def rolls(seed: int | str, serial: int, toxic: Toxic) -> bool:
    """Does ``toxic`` apply to connection ``serial``? Deterministic in (seed, serial, name,
    version); a toxicity of 1 always applies, 0 never."""
    if toxic.toxicity >= 1.0:
        return True
    if toxic.toxicity <= 0.0:
        return False
    rng = random.Random(f"{seed}/{serial}/{toxic.name}/{toxic.version}")
    return rng.random() < toxic.toxicity


def slice_offsets(start: int, end: int, average: int, variation: int,
                  rng: random.Random) -> list[int]:
    """Toxiproxy's slicer: cut ``[start, end)`` in about-equal halves until each piece is
    within ``variation`` of ``average``; returns the cut points, ``start`` and ``end``
    included. ``average`` 0 means no slicing."""
    if average <= 0 or (end - start) - average <= variation:
        return [start, end]
    mid = start + (end - start) // 2
    if variation > 0:
        mid += rng.randrange(variation * 2) - variation
    mid = min(max(mid, start + 1), end - 1)
    return slice_offsets(start, mid, average, variation, rng)[:-1] + \
        slice_offsets(mid, end, average, variation, rng)
