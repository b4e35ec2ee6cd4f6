"""Routing hints from the request (``metadata`` keys and headers), under an access policy.

Hints grant nothing by themselves: which client may use which hint is config. A hint that is
not allowed, or names something unknown, is refused with a 400 or ignored and recorded, per
config. Routing keys never reach a backend; OpenAI's metadata limits are enforced.
Pure functions: (body, headers, config) -> hints, then candidates -> filtered candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config import HintSettings
from .errors import refusal

HINT_KINDS = ("intent", "model", "backend", "order")
MAX_PAIRS, MAX_KEY, MAX_VALUE = 16, 64, 512


@dataclass(slots=True)
class Hints:
    values: dict[str, str] = field(default_factory=dict)   # kind -> value
    sources: dict[str, str] = field(default_factory=dict)  # kind -> "metadata:key" / "header:x"
    routing_keys: list[str] = field(default_factory=list)  # metadata keys to strip
    unknown_keys: list[str] = field(default_factory=list)  # under the prefix, not a hint
    context: dict[str, str] = field(default_factory=dict)  # propagated name -> value
    applied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    policy: str | None = None

    def record(self) -> dict[str, Any]:
        return {"hints": self.values, "sources": self.sources, "applied": self.applied,
                "ignored": self.ignored, "policy": self.policy}


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_metadata(meta: Any, header_keys: frozenset[str] = frozenset()) -> None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512;
    values of ``header_keys`` (propagated to a backend header) without control characters.
    Raises Refusal (a 400 naming the key)."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise refusal(400, "Invalid type for 'metadata': expected an object",
                      code="invalid_type", param="metadata")
    if len(meta) > MAX_PAIRS:
        raise refusal(400, f"'metadata' has {len(meta)} pairs; at most {MAX_PAIRS} are "
                      "allowed", code="invalid_metadata", param="metadata")
    for k, v in meta.items():
        if len(k) > MAX_KEY:
            raise refusal(400, f"metadata key '{k[:20]}...' is {len(k)} characters; at most "
                          f"{MAX_KEY} are allowed", code="invalid_metadata",
                          param=f"metadata.{k[:MAX_KEY]}")
        if not isinstance(v, str):
            raise refusal(400, f"metadata value for '{k}' must be a string",
                          code="invalid_metadata", param=f"metadata.{k}")
        if len(v) > MAX_VALUE:
            raise refusal(400, f"metadata value for '{k}' is {len(v)} characters; at most "
                          f"{MAX_VALUE} are allowed", code="invalid_metadata",
                          param=f"metadata.{k}")
        if k in header_keys and _CONTROL.search(v):
            raise refusal(400, f"metadata value for '{k}' contains control characters; it "
                          "is sent to the backend as a header", code="invalid_metadata",
                          param=f"metadata.{k}")


Sources = tuple[tuple[str, str | None, str | None], ...]


def hint_sources(cfg: HintSettings) -> Sources:
    """(kind, metadata key, header) per hint kind: worked out once per config."""
    out = []
    for kind in HINT_KINDS:
        name = getattr(cfg.metadata_keys, kind)
        header = getattr(cfg.headers, kind) if cfg.headers_enabled else None
        out.append((kind, cfg.metadata_prefix + name if name else None, header or None))
    return tuple(out)


def read_hints(data: dict[str, Any], headers: dict[str, str], cfg: HintSettings,
               sources: Sources | None = None) -> Hints:
    """Collect hints and propagated context; the metadata was already checked."""
    h = Hints()
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    sources = sources or hint_sources(cfg)
    known = {key for _, key, _ in sources if key}
    for key in meta:
        if key.startswith(cfg.metadata_prefix):
            h.routing_keys.append(key)
            if key not in known:
                h.unknown_keys.append(key)
    for kind, key, header in sources:
        if key and meta and isinstance(meta.get(key), str) and meta[key]:
            h.values[kind], h.sources[kind] = meta[key], f"metadata:{key}"
        if header and headers.get(header):
            h.values[kind], h.sources[kind] = headers[header], f"header:{header}"
    for header, key in cfg.propagate.items():
        value = meta.get(key) if key in meta else headers.get(key)
        if isinstance(value, str) and value:
            h.context[header] = value[:MAX_VALUE]
    return h


def allowed_kinds(cfg: HintSettings, client: str | None) -> set[str]:
    out: set[str] = set()
    for rule in cfg.access:
        if "*" in rule.clients or (client is not None and client in rule.clients):
            out |= set(rule.allow)
    return out


def allowed_intents(cfg: HintSettings, client: str | None) -> set[str] | None:
    """None means any configured intent."""
    out: set[str] = set()
    for rule in cfg.access:
        if "*" in rule.clients or (client is not None and client in rule.clients):
            if rule.intents is None:
                return None
            out |= set(rule.intents)
    return out
