"""The fast lane: requests Envoy routes by itself, their body never crossing gRPC.

A request needs the service only when something about it has to be decided or changed. For a
public model with one candidate, on a backend without a key of its own and with the standard
``/v1`` paths, a plain text request needs at most its model renamed and, for a stream, its
usage asked for: the route stage would send it otherwise unchanged to that one backend. Envoy
can do that alone: its ``json_to_metadata`` filter reads the body's top-level keys, a small Lua
filter checks what the keys cannot say (the path, hint headers, media parts), writes the
backend's name into the one ``model`` key when it differs (and ``stream_options`` into a
stream that has none), and sets the same metadata the route stage would, and a route on that
metadata sends it to the direct cluster with the route stage off. Measured: ~3x the requests
per second of the ext_proc path (docs/benchmark.md). ``envoy.fast_lane_compiled`` does the
same in C (``lane/lane.c``), by the same rules: the lists below.

Everything else takes the ext_proc path, and so does any request the lane is unsure of:
several candidates (health order, failover, judged answers), keys, forced capabilities (a
``tool_choice`` but "auto" or "none"), ``response_format``, ``metadata`` (hints) other than a
``user_id`` alone, hint headers, any content part but text, a stream with ``stream_options``
not asking for usage, bodies over ``envoy.fast_lane_max_bytes`` or not JSON. What the lane
keeps: Envoy's JSON errors, the response headers, the decision record (``plan: fast``) and
every metric, from the access log. What it gives up: our validation of the body (the backend
answers a malformed request with its own 4xx).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from ..config import Config, backend_endpoint
from .decision import DecisionRecord
from .endpoints import BY_PATH
from .routing import RoutingTable, Target

# The endpoints a fast request may call (to a backend that speaks them natively): their
# bodies carry no parts but in chat's, Anthropic's or Responses' messages (and system), which
# the Lua reads (any part other than text sends the request the slow way).
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
         "/v1/responses")
# Top-level keys whose presence needs the service: forced capabilities (judged answers) and
# structured output. (``tool_choice`` is read: "auto" and "none" force nothing, anything else
# takes the ext_proc path; so is ``metadata``: routing hints, see ``plain_metadata``.)
SLOW_KEYS = ("function_call", "response_format", "output_format")
# Anywhere in the body (a false alarm only costs the ext_proc path): media parts' marks (with
# SLOW_KEYS quoted, and NEED_KEYS where they make a need, the marks the lane looks for).
MARKS = ('"image', '"audio', '"video', '"file', '"input_text', '"input_image', '"input_audio',
         '"input_file', '"url"', '"document')
# Every "type" value the lane takes: text parts, tool calls and results, tools' JSON schemas,
# a Messages tool_choice forcing nothing, prompt caching (any other takes the ext_proc path)...
TYPES = ("text", "function", "tool_use", "tool_result", "object", "string", "number", "integer",
         "boolean", "array", "null", "auto", "none", "ephemeral")
# ...and per API passed natively: Responses' text parts and items (the marks of chat's that are
# its own), Messages' extended thinking (its setting and the blocks an agent sends back).
MESSAGES, RESPONSES = "/v1/messages", "/v1/responses"
OWN_TYPES = {RESPONSES: ("input_text", "output_text", "message", "function_call",
                         "function_call_output"),
             MESSAGES: ("thinking", "redacted_thinking", "enabled", "disabled", "adaptive")}
OWN_MARKS = {RESPONSES: ('"input_text', '"function_call"')}
# The paths where a stream's usage is asked for (Messages and Responses streams carry it), and
# where tool_choice is an object read by its type (Messages).
ASKS = ("/v1/chat/completions", "/v1/completions")
TYPED_CHOICE = (MESSAGES,)
# The tool_choice values that force nothing (core/capabilities.request_needs), as chat's
# string or Messages' ``{"type": ...}``.
FREE_CHOICES = ("auto", "none")
# ...and, where a candidate lacking a needed capability is dropped (an error, not an order),
# the keys that make a need.
NEED_KEYS = ("tools", "functions", "reasoning", "reasoning_effort")


@dataclass(frozen=True, slots=True)
class Lane:
    """One public model (or an alias of one) served in the fast lane."""

    model: str                # the name a client asks for
    public: str               # the public model it is (an alias's is another)
    served: str               # the backend's name for it (the Lua splices it into the body)
    backend: str
    address: str              # the backend's IP:port in Envoy's pool
    paths: tuple[str, ...]    # the endpoints of PATHS its backend speaks
    idle_ms: int              # a stream's silence limit (one of render.stream_idle_limits)
    metadata: bool = True     # its backend takes ``metadata`` as it is (OpenAI's: with store)


def lanes(cfg: Config) -> tuple[dict[str, Lane], dict[str, str]]:
    """The public models the fast lane serves, and for every other one why not. From the
    config alone (Envoy's config is rendered from it): a model another backend starts to list
    later is still sent to the configured one until Envoy's config is rendered again."""
    e = cfg.envoy
    table = RoutingTable(cfg)
    fast: dict[str, Lane] = {}
    why: dict[str, str] = {}
    off = "envoy.fast_lane is off" if not e.fast_lane else \
        "envoy.direct_cluster is off" if not e.direct_cluster else \
        "ai_gateway.model_header is set" if cfg.ai_gateway.model_header else None
    backends = {b.name: b for b in cfg.backends}
    for name, entry in table.entries.items():
        if entry.virtual:
            continue
        if off:
            why[name] = off
            continue
        if len(entry.candidates) != 1:
            why[name] = f"{len(entry.candidates)} candidates (ordered by health, failed over)"
            continue
        t = entry.candidates[0]
        b = backends[t.backend]
        paths = tuple(p for p in PATHS if p in table.routed_paths and
                      BY_PATH[p].api in table.apis[b.name])
        attempt_s, idle_s = table.limits[(t.backend, t.model)]
        reason = (t.model != name and json_escaped(t.model)) or (
            f"backend {b.name!r} has a key of its own" if b.api_key_env else
            f"backend {b.name!r} gets the client's key" if b.forward_client_auth else
            f"backend {b.name!r} is Azure (deployment paths)" if b.preset == "azure" else
            f"backend {b.name!r} is not at /v1" if backend_endpoint(b.url).base_path != "/v1"
            else "an attempt timeout of its own" if attempt_s != e.per_try_timeout_s else
            "none of chat, completions, embeddings, messages, responses routed to it"
            if not paths else None)
        if reason:
            why[name] = reason
            continue
        fast[name] = Lane(name, name, t.model, b.name, t.address, paths, int(1000 * idle_s),
                          table.profiles[b.name].metadata == "accept")
    for alias, public in table.aliases.items():  # as their public model, when it is fast
        lane = fast.get(public)
        reason = why.get(public, "a virtual model") if lane is None else \
            lane.served != alias and json_escaped(lane.served)
        if reason:
            why[alias] = off or f"an alias of {public!r}: {reason}"
        else:
            fast[alias] = replace(lane, model=alias)
    return fast, why


def plain_metadata(cfg: Config) -> str | None:
    """The one ``metadata`` key a fast request may carry, when the route stage would pass it
    on untouched (not a routing key, not propagated; to a backend that takes metadata without
    ``store``: ``Lane.metadata``): Anthropic's ``user_id``, which Claude Code sends with every
    request. Any other metadata takes the ext_proc path (hints)."""
    h = cfg.hints
    key = "user_id"
    return None if key.startswith(h.metadata_prefix) or key in h.propagate.values() else key


def marks(cfg: Config) -> list[str]:
    """What in a body sends it the ext_proc path: media parts' marks, the keys that need the
    service."""
    slow = [*SLOW_KEYS, *(NEED_KEYS if cfg.capability_routing.incapable == "drop" else ())]
    return [*MARKS, *(f'"{k}"' for k in slow)]


def record_socket(cfg: Config, worker: int) -> str:
    """Where the compiled lane sends service worker ``worker`` its records: a Unix datagram
    socket (``envoy.fast_lane_records``, worker i's with ``.i`` added; by default in the
    temporary directory, named after the service's port)."""
    base = cfg.envoy.fast_lane_records or str(
        Path(tempfile.gettempdir()) / f"llm-extproc-lane-{cfg.service.port}.sock")
    return base if worker == 0 else f"{base}.{worker}"


def json_escaped(served: str) -> str:
    """Why a name the Lua would write into the body cannot be (it writes bytes, not JSON)."""
    return f"served as {served!r}, which JSON would escape" if \
        orjson.dumps(served)[1:-1] != served.encode() else ""


@lru_cache(maxsize=256)
def _decided(requested: str, model: str, served: str, backend: str, address: str, api: str
             ) -> dict[str, Any]:
    """What every fast request for one name, endpoint and API has in common (the access log
    brings one per request: built once, not per request)."""
    return orjson.loads(DecisionRecord(
        request_id="", method="POST", model_requested=requested, public_model=model,
        resolution="alias" if requested != model else "exact",
        candidates=(Target(backend, served, address),), plan="fast", api=api).to_json())


def record(model: str, served: str, backend: str, address: str, request_id: str,
           path: str, requested: str = "") -> dict[str, Any]:
    """The decision record of a fast request (from what Envoy logged: ``requested`` only for
    an alias), as the route stage would have written it (the lane takes POSTs only); a new
    dict, its values shared."""
    endpoint = BY_PATH.get(path.partition("?")[0])
    return {**_decided(requested or model, model, served or model, backend, address,
                       endpoint.api.value if endpoint else "chat"),
            "request_id": request_id, "path": path}


def describe(cfg: Config) -> list[str]:
    """Which lane, then one line per public model: in the fast lane or why not (``extproc
    check``)."""
    fast, why = lanes(cfg)
    kind = {True: "compiled (lane.c)", False: "Lua"}.get(
        cfg.envoy.fast_lane_compiled, "compiled where `extproc up` starts Envoy 1.40 and a C "
        "compiler is there, else Lua (auto)")
    return [*([f"the fast lane: {kind}"] if fast else []),
            *(f"{n}: fast lane ({fast[n].backend})" if n in fast else f"{n}: ext_proc path "
              f"({why[n]})" for n in sorted({*fast, *why}))]


__all__ = ["ASKS", "FREE_CHOICES", "MESSAGES", "NEED_KEYS", "OWN_MARKS", "OWN_TYPES", "PATHS",
           "SLOW_KEYS", "TYPED_CHOICE", "TYPES", "Lane", "describe", "json_escaped", "lanes", "marks",
           "plain_metadata", "record", "record_socket"]
