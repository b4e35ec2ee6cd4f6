"""Route stage core: from (method, path, body) and the routing table to a decision or a reply.

Pure functions: no gRPC, no I/O. The routing table is compiled once per config load so the
per-request work is a dict lookup and one JSON parse.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Literal

import orjson

from ..config import Config, pool_addresses
from .capabilities import UNKNOWN, Caps, Needs, rank, request_needs
from .discovery import NOTHING, Catalog, exposed
from .endpoints import BY_PATH, PRESET_APIS, Api, Endpoint, endpoint_for
from .errors import Refusal, Reply, json_reply, refusal
from .health import Health
from .hints import (
    Hints,
    allowed_intents,
    allowed_kinds,
    check_metadata,
    hint_sources,
    read_hints,
)
from .parts import (
    Part,
    PartsReport,
    Profile,
    Sig,
    describe,
    inspect_parts,
    plan,
    profile_for,
    refused,
)

Resolution = Literal["exact", "alias", "default", "hint"]


@dataclass(frozen=True, slots=True)
class Target:
    """One candidate: a backend, the model name it expects, and its Envoy endpoint address."""

    backend: str
    model: str
    address: str


@dataclass(frozen=True, slots=True)
class PublicEntry:
    name: str
    candidates: tuple[Target, ...]
    owned_by: str
    virtual: bool
    # (tier, weight) per candidate when some tier holds several (they share its load): the
    # order is drawn per request. None: strict order.
    tiers: tuple[tuple[int, float], ...] | None = None
    fallback_on: frozenset[str] = frozenset()  # bad answers that move to the next candidate


@dataclass(slots=True)
class RouteDecision:
    """Where a request goes, and what it needs: the planner (``plan.py``) turns it into what
    Envoy is told."""

    requested: str | None
    public_model: str
    resolution: Resolution
    candidates: tuple[Target, ...]
    body: dict[str, Any] = field(default_factory=dict)
    sigs: list[Sig] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)  # as parsed: adapting reuses them
    warnings: list[str] = field(default_factory=list)
    dropped: list[tuple[Target, str]] = field(default_factory=list)
    needs: Needs = field(default_factory=Needs)
    hints: Hints = field(default_factory=Hints)
    # Remote URLs a candidate's backend would fetch itself: (url, param), each to be checked
    # against the fetch policy before the request leaves (that is I/O: the stage does it).
    url_checks: list[tuple[str, str]] = field(default_factory=list)
    # Candidates whose backend is down, with what health says (skipped while another is up).
    unavailable: list[dict[str, Any]] = field(default_factory=list)
    fallback_on: frozenset[str] = frozenset()
    endpoint: Endpoint = BY_PATH["/v1/chat/completions"]
    # Candidates whose backend lacks the endpoint's API: spoken to in its ``via`` API.
    translated: frozenset[Target] = frozenset()
    # Capabilities the backends reported (not declared), per candidate "backend/model".
    detected: dict[str, list[str]] = field(default_factory=dict)
    # The request's estimated size in tokens, and the candidates whose context is smaller.
    context: dict[str, Any] = field(default_factory=dict)


class RoutingTable:
    """Public names (exact and alias) to ordered candidates, compiled from the config and what
    discovery found (``catalog``): the models each backend lists are added to those the config
    declares, and a model a backend stopped listing is no longer routed there."""

    def __init__(self, cfg: Config, catalog: Catalog = NOTHING):
        self.config, self.catalog = cfg, catalog
        addresses = pool_addresses(cfg)
        self.profiles: dict[str, Profile] = {
            b.name: profile_for(b.preset, b.parts) for b in cfg.backends}
        # The APIs each backend speaks (its preset's unless the config lists them).
        self.apis: dict[str, frozenset[Api]] = {
            b.name: PRESET_APIS[b.preset] if b.apis is None else frozenset(map(Api, b.apis))
            for b in cfg.backends}
        # Every model each backend serves now, with what it can do (the config's word wins
        # over what the backend reported), its context, tags and attempt limits.
        self.served: dict[str, list[str]] = {}
        self.caps: dict[tuple[str, str], Caps] = {}
        self.context: dict[tuple[str, str], int] = {}
        self.tags: dict[tuple[str, str], frozenset[str]] = {}
        self.discovered: set[tuple[str, str]] = set()  # listed, not declared
        e = cfg.envoy
        self.limits: dict[tuple[str, str], tuple[float | None, float]] = {}
        for b in cfg.backends:
            declared = {m.name: m for m in b.models}
            listed = catalog.listed.get(b.name) if b.discovers else None
            found = {f.name: f for f in listed or ()}
            names = list(declared) + [n for n in found if n not in declared]
            self.served[b.name] = []
            for name in names:
                key = (b.name, name)
                if key in catalog.gone or (listed is not None and name not in found
                                           and name not in declared):
                    continue
                self.served[b.name].append(name)
                m, f = declared.get(name), found.get(name)
                if m is None:
                    self.discovered.add(key)
                self.caps[key] = Caps(frozenset(m.capabilities), None) \
                    if m is not None and m.capabilities is not None else \
                    (f.caps if f is not None and f.caps is not None else UNKNOWN)
                context = (m.context_length if m else None) or (f.context if f else None)
                if context:
                    self.context[key] = context
                self.tags[key] = frozenset(m.tags) if m else frozenset()
                self.limits[key] = (
                    (m.attempt_timeout_s if m else None) or b.attempt_timeout_s or
                    e.per_try_timeout_s,
                    (m.stream_idle_s if m else None) or b.stream_idle_s or e.stream_idle_s)
        self.aux_vision = cfg.vision is not None
        self.hint_sources = hint_sources(cfg.hints)
        self.header_metadata_keys = frozenset(cfg.hints.propagate.values())
        self.entries: dict[str, PublicEntry] = {}
        self.aliases: dict[str, str] = {}

        default_fallback = frozenset(cfg.capability_routing.fallback_on)

        def add(name: str, cands: list[Target], owned_by: str, virtual: bool = False,
                tiers: list[tuple[int, float]] | None = None,
                fallback: frozenset[str] = default_fallback) -> None:
            tup = tuple(cands)
            shared = tiers is not None and len({t for t, _ in tiers}) < len(tiers)
            self.entries[name] = PublicEntry(
                name, tup, owned_by, virtual, tuple(tiers) if shared and tiers else None,
                fallback)

        for pm in cfg.models:
            kept = [(i, c) for i, c in enumerate(pm.candidates) if (c.backend, c.model) in
                    self.caps]  # a candidate whose backend no longer lists it is left out
            if not kept:
                continue
            add(pm.name, [Target(c.backend, c.model, addresses[c.backend]) for _, c in kept],
                pm.owned_by,
                tiers=[(i if c.tier is None else c.tier, c.weight) for i, c in kept],
                fallback=default_fallback if pm.fallback_on is None
                else frozenset(pm.fallback_on))
            for alias in pm.aliases:
                self.aliases[alias] = pm.name
        aux = cfg.vision.backend if cfg.vision else None
        if cfg.expose_backend_models:
            by_model: dict[str, list[Target]] = {}
            for b in cfg.backends:
                if b.name == aux:
                    continue  # the aux vision model describes images; it is not a chat model
                d = b.discovery
                for name in self.served[b.name]:
                    public = exposed(name, d.include, d.exclude, d.prefix) \
                        if (b.name, name) in self.discovered else name
                    if public is None or public in self.entries or public in self.aliases:
                        continue  # not exposed, or the name is taken by a public model or alias
                    by_model.setdefault(public, []).append(
                        Target(b.name, name, addresses[b.name]))
            for name, cands in by_model.items():  # in backend order (tiers: a public model)
                add(name, cands, cands[0].backend)
        for vm in cfg.virtual_models:
            members = [Target(b.name, name, addresses[b.name]) for b in cfg.backends
                       if b.name != aux for name in self.served[b.name]
                       if set(vm.requires) <= self.caps[(b.name, name)].present
                       and set(vm.tags) <= self.tags[(b.name, name)]]
            members.sort(key=lambda t: vm.prefer.index(t.backend) if t.backend in vm.prefer
                         else len(vm.prefer))
            if members:  # listed only when at least one model backs it
                add(vm.name, members, "llm-extproc", virtual=True)
        self.routed_paths = frozenset(BY_PATH if cfg.routed_paths is None else cfg.routed_paths)
        self.created = int(time.time())

    def has(self, t: Target, capability: str) -> bool:
        """True only when the model is known to have the capability."""
        return self.caps.get((t.backend, t.model), UNKNOWN).has(capability)

    def models_where(self, ok: Callable[[Target], bool]) -> list[str]:
        """Public names (sorted) with at least one candidate for which ``ok`` holds."""
        return sorted(n for n, e in self.entries.items() if any(ok(c) for c in e.candidates))

    def lacks(self, t: Target, capability: str) -> bool:
        """True only when the model is known not to have the capability."""
        return self.caps.get((t.backend, t.model), UNKNOWN).lacks(capability)

    def routes(self) -> set[str]:
        """Every public name with each backend model it goes to (what discovery changes)."""
        return {f"{name}: {t.backend}/{t.model}" for name, e in self.entries.items()
                for t in e.candidates}

    def public_names(self) -> list[str]:
        return sorted(self.entries)

    def resolve(self, model: str) -> tuple[PublicEntry, Resolution] | None:
        entry = self.entries.get(model)
        if entry is not None:
            return entry, "exact"
        target = self.aliases.get(model)
        if target is not None:
            return self.entries[target], "alias"
        return None

    def models_list(self, health: Health | None = None, now: float = 0.0) -> dict[str, Any]:
        """``GET /v1/models``: each public model with, in fields OpenAI-compatible clients
        ignore, where it goes: each candidate's backend and model, what it can do (declared,
        or detected by discovery), its context length and its backend's health."""
        data = [
            {"id": n, "object": "model", "created": self.created, "owned_by": e.owned_by,
             **({"virtual": True, "members": [f"{t.backend}/{t.model}" for t in e.candidates]}
                if e.virtual else {}),
             "candidates": [self.describe(t, health, now) for t in e.candidates]}
            for n, e in sorted(self.entries.items())
        ]
        data += [
            {"id": a, "object": "model", "created": self.created, "owned_by": "llm-extproc",
             "alias_of": t}
            for a, t in sorted(self.aliases.items())
        ]
        return {"object": "list", "data": data}

    def describe(self, t: Target, health: Health | None = None, now: float = 0.0
                 ) -> dict[str, Any]:
        caps = self.caps.get((t.backend, t.model), UNKNOWN)
        out: dict[str, Any] = {
            "backend": t.backend, "model": t.model, "capabilities": sorted(caps.present),
            "capabilities_from": "detected" if caps.detected else
            "config" if caps.known is None else "unknown"}
        if caps.detected and caps.known is not None:  # what the backend's report covers
            out["capabilities_reported"] = sorted(caps.known)
        if (t.backend, t.model) in self.discovered:
            out["discovered"] = True
        if (t.backend, t.model) in self.context:
            out["context_length"] = self.context[(t.backend, t.model)]
        if health is not None:
            out["health"] = health.state(t.backend, now)["state"]
        return out


def _model_not_found(table: RoutingTable, model: str) -> Refusal:
    names = table.public_names() + sorted(table.aliases)
    return refusal(
        404,
        f"The model '{model}' does not exist. Available models: {', '.join(names)}",
        code="model_not_found",
        param="model",
        extra={"available_models": names},
    )


def answer_get(table: RoutingTable, path: str, health: Health | None = None, now: float = 0.0
               ) -> Reply:
    """GET requests the gateway answers itself from the config (raises Refusal: 404)."""
    if path in ("/v1/models", "/models"):
        return json_reply(200, table.models_list(health, now))
    prefix = "/v1/models/" if path.startswith("/v1/models/") else "/models/"
    if path.startswith(prefix):
        name = path[len(prefix):]
        for item in table.models_list(health, now)["data"]:
            if item["id"] == name:
                return json_reply(200, item)
        raise _model_not_found(table, name)
    raise refusal(404, f"Unknown path {path}", code="unknown_path", param=None)


def check_request_line(table: RoutingTable, method: str, path: str, has_body: bool = True,
                       health: Health | None = None, now: float = 0.0
                       ) -> Reply | tuple[Endpoint, str | None]:
    """The answer to a GET from the headers alone, or the endpoint a POST is for (and the
    model an Azure-style path names): wait for its body and route it. Raises Refusal for a
    path we do not route, a method it does not take, no body."""
    if method == "GET":
        return answer_get(table, path, health, now)
    try:
        endpoint, path_model = endpoint_for(path, table.routed_paths)
    except KeyError:
        endpoint = None
    if endpoint is None or (endpoint.api is not Api.OTHER and endpoint.path not in
                            table.routed_paths):
        raise refusal(
            404,
            f"Unknown path {path}; routed paths: {', '.join(sorted(table.routed_paths))}",
            code="unknown_path",
        )
    if method != "POST":
        raise refusal(405, f"Method {method} is not allowed on {path}; use POST",
                      code="method_not_allowed")
    if not has_body:
        raise refusal(400, "The request has no body; expected "
                      + ("a multipart/form-data upload" if endpoint.form else "a JSON object"),
                      code="invalid_form" if endpoint.form else "invalid_json")
    return endpoint, path_model


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Parse a request body; a syntax error and a wrong top-level type are told apart."""
    if not body:
        raise refusal(400, "The request body is empty; expected a JSON object",
                      code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise refusal(
            400,
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno} (char {exc.pos})",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise refusal(
            400,
            f"The request body must be a JSON object, got {type(data).__name__}",
            code="invalid_type",
        )
    return data


# Keys that fold to "model" (Go's encoding/json matches struct fields case-insensitively): only
# ASCII letters fold to m, o, d, e or l, so these 31 are all of them.
_CASE_VARIANTS = frozenset(
    "".join(c) for c in product(*zip("model", "MODEL", strict=True))) - {"model"}
# A JSON escape of an ASCII letter: no encoder writes one, so in a key it hides a name.
_LETTER_ESCAPE = re.compile(rb"\\u00(?:4[1-9a-fA-F]|5[0-9aA]|6[1-9a-fA-F]|7[0-9aA])")


def model_key(raw: bytes, data: dict[str, Any]) -> bool:
    """Whether the body must be re-serialised so that what leaves the gateway has exactly one
    ``model`` key, the one routed on; a 400 for a key only case folding makes ``model``.

    Parsers disagree where JSON is ambiguous: with duplicate keys some take the first value,
    orjson (and Go) the last; a Go server also matches ``"Model"`` to its ``model`` field. A
    duplicate, a ``null`` model or an escaped key (``"m\\u006fdel"``) is made canonical by
    re-serialising the parsed body (the value routed on); a case variant is refused. Cheap for
    ordinary bodies: one count and one scan in C."""
    if not _CASE_VARIANTS.isdisjoint(data):
        k = next(k for k in data if k in _CASE_VARIANTS)
        raise refusal(400, f"Unrecognized request argument '{k}': the model is given as "
                      "'model'", code="invalid_request", param=k)
    if "model" in data and data["model"] is None:
        del data["model"]  # routed to the default: the backend gets that name alone
        return True
    # Mostly media (few quotes in the first 64 KiB): walk the quotes; text: count.
    found = _quoted_model(raw) if len(raw) > 65536 and raw.count(b'"', 0, 65536) < 128 \
        else None
    if found is None:
        found = raw.count(b'"model"'), b"\\" in raw and _LETTER_ESCAPE.search(raw) is not None
    return found[0] != ("model" in data) or found[1]


def _quoted_model(raw: bytes, max_quotes: int = 1024) -> tuple[int, bool] | None:
    """(strings that are exactly ``model``, whether a short string escapes a letter), from the
    text between consecutive quotes; None over ``max_quotes``. Large bodies are mostly media
    payloads, which hold no quote: this skips them at memchr speed where a substring count
    crawls through every byte (4 MB: 1.8 ms). Every string's content lies between its
    opening quote and the next quote (an escaped quote inside cannot be part of ``model``)."""
    count, escaped, n = 0, False, 0
    i = raw.find(b'"')
    while i >= 0:
        n += 1
        if n > max_quotes:
            return None
        j = raw.find(b'"', i + 1)
        if j < 0:
            break
        if j - i <= 31:  # "model" written with escapes is at most 30 bytes
            seg = raw[i + 1:j]
            if seg == b"model":
                count += 1
            elif b"\\" in seg and _LETTER_ESCAPE.search(seg):
                escaped = True
        i = j
    return count, escaped


def route_request(table: RoutingTable, data: dict[str, Any],
                  headers: dict[str, str] | None = None, health: Health | None = None,
                  now: float = 0.0, draw: Callable[[], float] = random.random,
                  endpoint: Endpoint = BY_PATH["/v1/chat/completions"]) -> RouteDecision:
    """Pick the ordered candidates for a parsed POST body by its ``model``; raises Refusal.
    ``health``: which backends are down at ``now`` (monotonic); ``draw``: the randomness that
    spreads a tier's load (the tests pass their own); ``endpoint``: what the body is (an API
    with conversations of its own is read through its chat view)."""
    headers = headers or {}
    check_metadata(data.get("metadata"), table.header_metadata_keys)
    model = data.get("model")
    resolution: Resolution
    if model is None:
        default = table.config.default_model
        if default is None:
            raise refusal(400, "You must provide a model parameter ('model')",
                          code="missing_model", param="model")
        found = table.resolve(default)
        assert found is not None  # validated at config load
        entry, resolution = found[0], "default"
    elif not isinstance(model, str):
        raise refusal(400, f"Invalid type for 'model': expected a string, got "
                      f"{type(model).__name__}", code="invalid_type", param="model")
    else:
        found = table.resolve(model)
        if found is None:
            raise _model_not_found(table, model)
        entry, resolution = found
    view, origins = data, None
    if endpoint.translator is not None:
        chat_view = endpoint.translator.to_chat(data, False, "")
        view, origins = chat_view.data, chat_view.origins
    report = inspect_parts(view, table.config.service.max_part_bytes, origins=origins) \
        if endpoint.dialect is not None else PartsReport()
    urls = {p.url for p in report.parts if p.url and p.sig.source in ("http", "https")}
    limit = table.config.fetch.max_urls_per_request
    if len(urls) > limit:
        raise refusal(400, f"The request has {len(urls)} remote media URLs; at most {limit} "
                      "are allowed (fetch.max_urls_per_request)", code="too_many_urls",
                      param="messages")
    hints = read_hints(data, headers, table.config.hints, table.hint_sources)
    if hints.unknown_keys:
        _unknown_keys(table, hints)
    if hints.values:
        pinned = _pinned_model(table, hints, headers)
        if pinned is not None:
            entry, resolution = pinned, "hint"
    decision = RouteDecision(
        requested=model if isinstance(model, str) else None,
        public_model=entry.name,
        resolution=resolution,
        candidates=entry.candidates,
        body=data,
        sigs=report.sigs,
        parts=report.parts,
        warnings=report.warnings,
        hints=hints,
        fallback_on=entry.fallback_on,
        endpoint=endpoint,
    )
    if entry.tiers is not None:
        decision.candidates = spread(entry.candidates, entry.tiers, draw)
    if hints.values:
        _apply_hints(table, decision, headers)
    if endpoint.api is not Api.OTHER:
        _filter_by_api(table, decision)
    if decision.sigs:
        _filter_by_parts(table, decision, report.parts)
        if not table.aux_vision and any(s.kind == "image" for s in decision.sigs):
            _filter_blind(table, decision)
    if endpoint.dialect is not None:
        decision.needs = request_needs(view, decision.sigs,
                                       table.config.capability_routing.judge_max_schema_bytes)
    if entry.fallback_on:
        decision.needs.bad = set(entry.fallback_on)
    if decision.needs.needed:
        _order_by_needs(table, decision)
    order = hints.values.get("order")
    if order and "order" in hints.applied:
        prefer = [b.strip() for b in order.split(",")]
        decision.candidates = tuple(sorted(decision.candidates, key=lambda t: (
            prefer.index(t.backend) if t.backend in prefer else len(prefer))))
    if table.context and endpoint.dialect is not None:
        _order_by_context(table, decision, view)
    if decision.sigs:
        decision.url_checks = _url_checks(table, decision)
    if health is not None and health.down:
        _skip_down(decision, health, now)
    if table.discovered:
        decision.detected = {f"{t.backend}/{t.model}": sorted(c.present) for t in
                             decision.candidates if (c := table.caps.get(
                                 (t.backend, t.model), UNKNOWN)).detected}
    return decision


def estimate_tokens(chat: dict[str, Any]) -> int:
    """A request's size in tokens, roughly: its text (message contents, text parts, tool
    definitions) at four characters a token, plus the output it asks room for
    (``max_tokens``/``max_completion_tokens``). Media are not counted."""
    chars = 0
    for msg in chat.get("messages") if isinstance(chat.get("messages"), list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p["text"]) for p in content if isinstance(p, dict)
                         and isinstance(p.get("text"), str))
    if chat.get("tools"):
        chars += len(orjson.dumps(chat["tools"]))
    out = chat.get("max_completion_tokens") or chat.get("max_tokens")
    return chars // 4 + (out if isinstance(out, int) and out > 0 else 0)


def _order_by_context(table: RoutingTable, d: RouteDecision, chat: dict[str, Any]) -> None:
    """Candidates whose context is known to be too small for the request go after the others
    (never dropped: the estimate is rough, and a backend may still take it)."""
    known = [t for t in d.candidates if (t.backend, t.model) in table.context]
    if not known:
        return
    tokens = estimate_tokens(chat)
    small = [t for t in known if table.context[(t.backend, t.model)] < tokens]
    d.context = {"estimated_tokens": tokens,
                 **({"too_small": [f"{t.backend}/{t.model}" for t in small]} if small else {})}
    if small:
        d.candidates = tuple([t for t in d.candidates if t not in small] + small)


def _filter_by_api(table: RoutingTable, d: RouteDecision) -> None:
    """Only candidates whose backend speaks the endpoint's API, or the API it is translated
    to; a 400 naming the models that serve it when none is left."""
    e = d.endpoint

    def speaks(t: Target) -> bool:
        return e.api in table.apis[t.backend]

    def reachable(t: Target) -> bool:
        return speaks(t) or (e.via is not None and e.via in table.apis[t.backend])

    keep = [t for t in d.candidates if reachable(t)]
    if not keep:
        able = table.models_where(reachable)
        raise refusal(
            400, f"No candidate of model '{d.public_model}' serves {e.path} ({e.api.value}). "
            + (f"Models that do: {', '.join(able)}" if able else "No configured model does."),
            code="unsupported_endpoint", param="model",
            extra={"models_serving_endpoint": able})
    d.dropped += [(t, f"the {e.api.value} API") for t in d.candidates if not reachable(t)]
    d.candidates = tuple(keep)
    d.translated = frozenset(t for t in keep if not speaks(t))
    if d.translated and e.translator is not None:
        try:  # what translation cannot carry (hosted tools, stored state): native ones only
            e.translator.to_chat(d.body, True, "")
        except Refusal:
            native = tuple(t for t in d.candidates if t not in d.translated)
            if not native:
                raise
            d.dropped += [(t, f"this request in {e.via} (it lacks {e.api.value})")
                          for t in d.translated]
            d.candidates, d.translated = native, frozenset()


def spread(cands: tuple[Target, ...], tiers: tuple[tuple[int, float], ...],
           draw: Callable[[], float]) -> tuple[Target, ...]:
    """Tiers in order; within a tier, a weighted random order (each candidate first in
    proportion to its weight: Efraimidis-Spirakis keys), drawn per request."""
    keyed = sorted(zip(cands, tiers, strict=True),
                   key=lambda it: (it[1][0], -(draw() ** (1.0 / it[1][1]))))
    return tuple(t for t, _ in keyed)


def _skip_down(d: RouteDecision, health: Health, now: float) -> None:
    """Candidates whose backend is down are skipped while another is up: no request waits for
    a dead host's connect timeout, and the request is planned as if they were not configured
    (one candidate left: straight to it). When every candidate is down, all are tried."""
    down = [t for t in d.candidates if not health.available(t.backend, now)]
    if not down:
        return
    d.unavailable = [{**health.state(t.backend, now), "model": t.model,
                      "skipped": len(down) < len(d.candidates)} for t in down]
    if len(down) < len(d.candidates):
        d.candidates = tuple(t for t in d.candidates if t not in down)


def attempt_limits(table: RoutingTable, d: RouteDecision) -> tuple[float | None, float]:
    """How long one attempt of this request may take (non-streaming) and may stay silent
    (streaming): the longest any of its candidates is allowed, so none is cut short."""
    limits = [table.limits[(t.backend, t.model)] for t in d.candidates]
    attempt = None if any(a is None for a, _ in limits) else max(a for a, _ in limits if a)
    return attempt, max(idle for _, idle in limits)


def _url_checks(table: RoutingTable, d: RouteDecision) -> list[tuple[str, str]]:
    """Remote URLs some candidate's backend is handed as URLs (it fetches them itself) and
    checks: they must pass the fetch policy like our own fetches."""
    profiles = [p for p in {table.profiles[t.backend] for t in d.candidates} if p.check_urls]
    out: dict[str, str] = {}
    for part in d.parts:
        if part.url and part.sig.source in ("http", "https") and part.url not in out and \
                any(plan(p, part.sig) in ("keep", "reshape") for p in profiles):
            out[part.url] = part.path
    return list(out.items())


def _hint_refused(table: RoutingTable, hints: Hints, kind: str, why: str, denied: bool) -> None:
    """Per config: refuse with a 400 (403 for not allowed), or ignore and record."""
    cfg = table.config.hints
    if (cfg.on_denied if denied else cfg.on_unknown) == "ignore":
        hints.ignored.append(f"{kind}: {why}")
        return
    source = hints.sources[kind]
    raise refusal(403 if denied else 400, f"Routing hint {kind}={hints.values[kind]!r} "
                  f"({source}): {why}", code="hint_not_allowed" if denied else "unknown_hint",
                  param=source.split(":", 1)[1])


def _unknown_keys(table: RoutingTable, hints: Hints) -> None:
    """A metadata key under the routing prefix that is no hint (a typo, or a key the config
    does not enable) follows ``on_unknown`` like an unknown intent: a 400, or ignored and
    recorded. It is never passed to a backend either way."""
    cfg = table.config.hints
    if cfg.on_unknown == "ignore":
        hints.ignored += [f"metadata.{k}: not a routing key" for k in hints.unknown_keys]
        return
    key = hints.unknown_keys[0]
    known = [k for _, k, _ in table.hint_sources if k]
    raise refusal(400, f"Unknown routing key 'metadata.{key}': the keys under "
                  f"'{cfg.metadata_prefix}' are {', '.join(known) or 'none'} "
                  "(hints.metadata_keys)", code="unknown_hint", param=f"metadata.{key}")


def _client(table: RoutingTable, headers: dict[str, str]) -> str | None:
    return headers.get(table.config.hints.client_header)


def _pinned_model(table: RoutingTable, hints: Hints, headers: dict[str, str]
                  ) -> PublicEntry | None:
    value = hints.values.get("model")
    if value is None:
        return None
    if "model" not in allowed_kinds(table.config.hints, _client(table, headers)):
        _hint_refused(table, hints, "model", "this client may not pin a model", True)
        return None
    found = table.resolve(value)
    if found is None:
        _hint_refused(table, hints, "model", "no such model", False)
        return None
    hints.applied.append("model")
    return found[0]


def _apply_hints(table: RoutingTable, d: RouteDecision, headers: dict[str, str]) -> None:
    hints, cfg = d.hints, table.config.hints
    client = _client(table, headers)
    allowed = allowed_kinds(cfg, client)
    for kind in ("intent", "backend", "order"):
        if kind in hints.values and kind not in allowed:
            _hint_refused(table, hints, kind, f"this client may not use the {kind} hint", True)
            del hints.values[kind]
    intent = hints.values.get("intent")
    if intent is not None:
        policy = cfg.policies.get(intent)
        permitted = allowed_intents(cfg, client)
        if policy is None:
            _hint_refused(table, hints, "intent", "no such intent (known: "
                          f"{', '.join(sorted(cfg.policies)) or 'none'})", False)
        elif permitted is not None and intent not in permitted:
            _hint_refused(table, hints, "intent", "this client may not use it", True)
        else:
            tags = table.tags
            keep = [t for t in d.candidates
                    if set(policy.require_tags) <= tags[(t.backend, t.model)]
                    and not set(policy.exclude_tags) & tags[(t.backend, t.model)]]
            if not keep:
                raise refusal(
                    400, f"No candidate of model '{d.public_model}' fits intent '{intent}' "
                    f"(requires tags {policy.require_tags}, excludes {policy.exclude_tags})",
                    code="no_candidate_for_intent", param=hints.sources["intent"].split(":")[1])
            d.dropped += [(t, f"intent {intent}") for t in d.candidates if t not in keep]
            keep.sort(key=lambda t: not set(policy.prefer_tags) & tags[(t.backend, t.model)])
            d.candidates = tuple(keep)
            hints.applied.append("intent")
            hints.policy = intent
    backend = hints.values.get("backend")
    if backend is not None:
        keep = [t for t in d.candidates if t.backend == backend]
        if not keep:
            known = backend in {b.name for b in table.config.backends}
            _hint_refused(table, hints, "backend", "not a candidate of model "
                          f"'{d.public_model}'" if known else "no such backend", False)
        else:
            d.candidates = tuple(keep)
            hints.applied.append("backend")
    if "order" in hints.values:
        hints.applied.append("order")  # applied last, after capability ordering


def _order_by_needs(table: RoutingTable, d: RouteDecision) -> None:
    """All needs declared first, unknown (or substitutable) next, known-incapable last or
    dropped; stable otherwise. A forced need nobody can serve is a 400."""
    needs = d.needs
    substitutable = {"vision"} if table.aux_vision else set()
    hard = (needs.forced | (needs.needed & {"vision", "audio"})) - substitutable
    for cap in sorted(hard):
        if all(table.lacks(t, cap) for t in d.candidates):
            able = table.models_where(lambda c, cap=cap: table.has(c, cap))
            what = "forces" if cap in needs.forced else "needs"
            raise refusal(
                400, f"The request {what} the '{cap}' capability, but no candidate of model "
                f"'{d.public_model}' has it. "
                + (f"Models with '{cap}': {', '.join(able)}" if able else f"No model has '{cap}'."),
                code="unsupported_capability", param=_CAP_PARAM.get(cap),
                extra={"capability": cap, "models_with_capability": able})
    ranked = sorted(enumerate(d.candidates), key=lambda it: (
        rank(table.caps.get((it[1].backend, it[1].model), UNKNOWN), needs.needed,
             substitutable), it[0]))
    keep = [t for _, t in ranked]
    if table.config.capability_routing.incapable == "drop":
        able = [t for t in keep if rank(table.caps.get((t.backend, t.model), UNKNOWN),
                                        needs.needed, substitutable) < 2]
        if able:  # never silently drop every candidate
            d.dropped += [(t, "a needed capability") for t in keep if t not in able]
            keep = able
    d.candidates = tuple(keep)


_CAP_PARAM = {"tools": "tool_choice", "json": "response_format", "vision": "messages",
              "audio": "messages", "reasoning": "reasoning_effort"}


def _filter_blind(table: RoutingTable, d: RouteDecision) -> None:
    """Without an aux vision model, never hand an image to a model known not to see."""
    keep = [t for t in d.candidates if not table.lacks(t, "vision")]
    d.dropped += [(t, "images (no vision, no auxiliary vision model)") for t in d.candidates
                  if table.lacks(t, "vision")]
    if not keep:
        able = table.models_where(lambda c: table.has(c, "vision"))
        raise refusal(
            400, f"The request contains images, but no candidate of model '{d.public_model}' has "
            "the 'vision' capability and no auxiliary vision model is configured. "
            + (f"Models with vision: {', '.join(able)}" if able else "No model has vision."),
            code="unsupported_capability", param="messages",
            extra={"capability": "vision", "models_with_capability": able})
    d.candidates = tuple(keep)


def _filter_by_parts(table: RoutingTable, d: RouteDecision, parts: list[Any]) -> None:
    """Drop candidates whose backend cannot take some part even after conversion."""
    keep: list[Target] = []
    for t in d.candidates:
        bad = refused(table.profiles[t.backend], d.sigs)
        if bad is None:
            keep.append(t)
        else:
            d.dropped.append((t, describe(bad)))
    if not keep:
        sig = refused(table.profiles[d.candidates[0].backend], d.sigs)
        assert sig is not None
        where = next(p.path for p in parts if p.sig == sig)
        able = table.models_where(lambda c: refused(table.profiles[c.backend], [sig]) is None)
        backends = ", ".join(f"{t.backend} ({t.model})" for t in d.candidates)
        if sig.kind == "audio":
            fmts = sorted({f for t in d.candidates for f in table.profiles[t.backend].audio_formats})
            if fmts:
                backends += f"; they accept audio formats: {', '.join(fmts)}"
        raise refusal(
            400,
            f"{where}: a {describe(sig)} cannot be sent to any candidate of model "
            f"'{d.public_model}' ({backends}), and no conversion exists. "
            + (f"Models that accept it: {', '.join(able)}" if able else
               "No configured model accepts it."),
            code="unsupported_content", param=where, extra={"models_accepting": able})
    d.candidates = tuple(keep)

