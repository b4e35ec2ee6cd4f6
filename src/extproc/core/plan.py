"""The planner: what Envoy is told, for a request and for each attempt, as plain data.

Pure functions of what a request looks like, the routing decision and the compiled config:

- ``route``: the route stage's answer. The cluster picks how attempts are handled: ``direct``
  (nothing differs between candidates: the request is prepared whole here and no attempt stage
  runs), ``judged`` (prepared whole, but answers are judged or held, so the attempt stage sees
  the responses), ``per_attempt`` (the attempt stage adapts every attempt). Then the headers to
  set and remove, the dynamic metadata (the hand-off, and what Envoy's route and access log
  read), and the new body or the body work to do first.
- ``attempt``: one attempt's request headers, and whether its body must change.
- ``response``: whether an answer is held (to judge it, or to keep it whole for failover).

The shell turns plans into protobuf; ``effects/adapt.py`` does body work. Tests drive the
planner without either (``tests/unit/test_plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

import orjson

from ..config import Config
from ..contract import (
    CLUSTER_HEADER,
    MAX_RETRIES_HEADER,
    PER_TRY_HEADER,
    RESP_UNMET,
    RETRY_HEADER,
    STREAM_HEADER,
    Cluster,
    HandOff,
    Meta,
)
from .backends import (
    BackendRuntime,
    client_credentials,
    common_backend,
    credential_headers,
    header_plan,
    pick_candidate,
    set_model,
    target_path,
)
from .capabilities import READABLE_ENCODINGS, Needs, Verdict, readable_accept_encoding
from .endpoints import BY_PATH, Api, Endpoint
from .errors import refusal
from .health import retry_after_seconds
from .parts import Sig, needs_change
from .routing import RouteDecision, RoutingTable, Target, attempt_limits

PlanKind = Literal["direct", "judged", "per_attempt"]
# The most of a translated request its answer repeats (Responses' instructions, tools) that
# travels to the attempt stage as metadata; more, and each attempt translates from the body.
ECHO_MAX_BYTES = 8192


@dataclass(frozen=True, slots=True)
class BodyWork:
    """What a body needs beyond its model name, for one backend: its images described (the
    model cannot see), parts reshaped, fetched or transcoded, ``metadata`` dropped (taken only
    with ``store: true``). ``effects/adapt.py`` does it."""

    backend: str
    model: str
    substitute: bool = False
    drop_metadata: bool = False
    endpoint: Endpoint = BY_PATH["/v1/chat/completions"]  # whose shapes the body is in
    translated: bool = False  # the backend lacks that API: the body goes in the API it speaks


@dataclass(slots=True)
class RequestView:
    """What the route stage knows of the client's request."""

    method: str
    path: str                    # as sent, query included
    headers: dict[str, str]
    body: bytes
    data: dict[str, Any]         # the parsed body (the plan may change it); a form's fields
    reserialise: bool = False    # its model key is not canonical (routing.model_key)

    @property
    def streaming(self) -> bool:
        return self.data.get("stream") is True


@dataclass(slots=True)
class RoutePlan:
    kind: PlanKind
    cluster: Cluster
    set_headers: list[tuple[str, str]]
    remove_headers: list[str]
    metadata: dict[str, str]
    body: bytes | None = None          # the new body, when it is known now
    work: BodyWork | None = None       # or the work to do before it is (effects)
    url_checks: list[tuple[str, str]] = field(default_factory=list)  # (url, param): effects
    # The route stage translates the answer back (its stream sees the response): what of the
    # request the answer repeats. None: nothing to translate there.
    answer_echo: dict[str, Any] | None = None


@dataclass(slots=True)
class AttemptPlan:
    target: Target
    last: bool                         # no candidate after this one: a failed check stands
    set_headers: list[tuple[str, str]]
    remove_headers: list[str]
    body_model: str | None             # what the body's model says before this attempt
    work: BodyWork | None              # the body changes beyond its model (effects)
    needs_body: bool                   # Envoy sends the request body: it changes
    needs_response: bool               # Envoy sends the response body: judged or held
    translated: bool = False           # spoken to in another API: request and answer change


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    hold: bool                         # answer the headers only once the body decided
    needs: Needs | None                # what the answer is judged against (None: nothing)
    stream: bool
    inflate: str | None = None         # a compressed answer the judge must decompress
    unreadable: str | None = None      # an encoding the judge cannot read: not judged
    rate_limited: bool = False         # a 429: the next candidate now, this backend cools down
    retry_after_s: float | None = None  # for how long (its Retry-After)
    translate: bool = False            # the answer goes back in the client's API


class Planner:
    """Built once per config (``runtime.py``)."""

    def __init__(self, config: Config, table: RoutingTable, backends: dict[str, BackendRuntime]):
        self.config, self.table, self.backends = config, table, backends
        self.vision = config.vision is not None
        # Every header that carries a credential (client kinds and each backend's): removed on
        # every attempt before the attempt's own is set.
        self.credentials = credential_headers(backends)
        self.strip_headers = frozenset(config.strip_client_headers)
        # Hint headers, the intent header and client copies of propagated headers: removed
        # from every request.
        h = config.hints
        self.hint_headers = tuple(n for n in h.headers.model_dump().values() if n) + \
            tuple(h.propagate) + ((h.intent_header,) if h.intent_header else ())
        # The APIs some backend lacks (a request in one may be translated): the route stage
        # asks for those answers' headers (``watches_answers``).
        self.lacking = frozenset(api for apis in table.apis.values() for api in Api
                                 if api not in apis)

    # ------------------------------------------------------------ the route stage

    def stripped(self, headers: dict[str, str]) -> list[str]:
        """Client headers removed at once: Envoy honours some x-envoy-* request headers
        (timeouts, retries), never a client's; nor our own names; nor what the config says no
        backend may see."""
        strip = self.strip_headers
        return [k for k in headers if k in strip or k.startswith(("x-envoy-", "x-extproc-"))]

    def route(self, view: RequestView, d: RouteDecision) -> RoutePlan:
        cfg, data, e = self.config, view.data, d.endpoint
        unstored = bool(data.get("metadata")) and data.get("store") is not True
        aig = cfg.ai_gateway.model_header
        # What a translated answer repeats of the request (computed once: it decides whether
        # the route stage may translate, and it is handed off)
        tx = e.translator if d.translated and not aig else None
        echo = tx.echo(data) if tx is not None else None
        found = self._prepared(d, unstored, echo)
        prepared, work = found if found is not None else (None, None)
        if aig:  # inside Envoy AI Gateway (no attempt stage there): see _in_ai_gateway
            return self._in_ai_gateway(view, d, aig, work)
        # Translated here, for every candidate alike; its answer translated back by the route
        # stage itself when it is the one candidate and not judged (no attempt stage at all),
        # else by the attempt stage.
        whole_tx = prepared is not None and bool(d.translated)
        judged = bool(d.needs.needed or d.needs.bad)
        answer_here = whole_tx and len(d.candidates) == 1 and not judged and \
            self.watches_answers(e)
        kind: PlanKind = "per_attempt" if prepared is None else \
            "judged" if d.needs.forced or len(d.candidates) > 1 or (
                whole_tx and not answer_here) else "direct"
        cluster = {"direct": Cluster.DIRECT, "judged": Cluster.JUDGED,
                   "per_attempt": Cluster.POOL}[kind]
        meta: dict[str, str] = {Meta.HOSTS: endpoint_list(d.candidates),
                                Meta.PUBLIC_MODEL: d.public_model}
        if d.hints.policy:
            meta[Meta.INTENT] = d.hints.policy
        creds = client_credentials(view.headers)
        set_headers = [(CLUSTER_HEADER, cluster.value),
                       (MAX_RETRIES_HEADER, str(len(d.candidates) - 1))]
        attempt_s, idle_s = attempt_limits(self.table, d)
        if view.streaming:  # Envoy's route for this silence limit
            set_headers.append((STREAM_HEADER, str(int(idle_s * 1000))))
        elif attempt_s is not None and attempt_s != cfg.envoy.per_try_timeout_s:
            set_headers.append((PER_TRY_HEADER, str(int(attempt_s * 1000))))
        # Hint headers, the intent header and client copies of propagated headers never reach
        # a backend.
        remove = list(self.hint_headers)
        set_headers += self._hint_headers(d)
        # The model the body must carry from here: a prepared request names the backend's
        # model now, and so does one whose candidates all serve one name (the attempt stage
        # then skips the body unless a part needs reshaping).
        served = d.candidates[0].model
        uniform = all(t.model == served for t in d.candidates)
        model_out = served if uniform else None
        body_model = d.requested if d.resolution != "default" else None
        if prepared is not None:
            path = target_path(prepared, e, whole_tx, view.path, served)
            plan = header_plan(prepared, path, self.credentials, creds, view.path)
            set_headers += plan.set
            remove += plan.remove
            if whole_tx:  # its answer is rewritten: plain bytes
                set_headers.append(("accept-encoding", "identity"))
            if kind == "judged":
                meta.update(HandOff(d.candidates, needs=d.needs if judged else None,
                                    endpoint=e, echo=echo).encode())
            else:  # no attempt stage will name the backend: Envoy's route adds these
                meta[Meta.BACKEND], meta[Meta.MODEL] = d.candidates[0].backend, served
                if whole_tx:  # (Envoy's own errors: in the client's envelope, routes.py)
                    meta[Meta.ENDPOINT] = e.path
        else:  # each attempt sets its own backend's credentials and path from the hand-off
            remove += creds
            backends = [self.backends[t.backend] for t in d.candidates]
            forwards = any(b.forward_client_auth and b.auth_value is None for b in backends)
            moved = any(target_path(b, e, t in d.translated, view.path, t.model) != view.path
                        for b, t in zip(backends, d.candidates, strict=True))
            meta.update(HandOff(
                d.candidates, model_out or body_model,
                tuple(d.sigs), d.needs if judged else None, unstored,
                view.path if moved else None, creds if forwards else {}, e).encode())
        # A Chat or Completions stream whose client did not ask for usage: we ask for it, and
        # for the stream uncompressed (the Lua reads and edits its events; identity is always
        # acceptable to a client, and compressing events only delays them).
        options = data.get("stream_options")
        add_usage = view.streaming and cfg.envoy.token_usage and \
            e.api in (Api.CHAT, Api.COMPLETIONS) and \
            not (isinstance(options, dict) and options.get("include_usage") is True)
        accept = view.headers.get("accept-encoding")
        if add_usage and accept:
            remove.append("accept-encoding")
        elif accept and judged and kind != "direct" and not whole_tx:
            # (judged: only encodings the judge reads)
            readable = readable_accept_encoding(accept)
            if readable is None:
                remove.append("accept-encoding")
            elif readable != accept:
                set_headers.append(("accept-encoding", readable))
        named = {k for k, _ in set_headers}
        out = RoutePlan(kind, cluster, set_headers, [r for r in remove if r not in named], meta,
                        work=work, url_checks=d.url_checks,
                        answer_echo=echo if answer_here else None)
        if d.warnings:
            meta[Meta.WARNINGS] = "; ".join(d.warnings)[:2000]
        reserialise = view.reserialise
        if add_usage:  # Envoy's response-side Lua reads the usage chunk and drops it
            options = data.get("stream_options")
            data["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}
            meta[Meta.USAGE_ADDED] = "1"
            reserialise = True
        if drop_routing_keys(data, d):  # (never to a backend)
            reserialise = True
        out.body = new_body(view, d, model_out, reserialise, work)
        return out

    def _hint_headers(self, d: RouteDecision) -> list[tuple[str, str]]:
        """Headers the hints set: propagated context, and the intent (a client's own copies
        are always removed)."""
        hcfg = self.config.hints
        out = [(h, v) for h, v in d.hints.context.items() if h in hcfg.propagate]
        if d.hints.policy and hcfg.intent_header:
            out.append((hcfg.intent_header, d.hints.policy))
        return out

    def _in_ai_gateway(self, view: RequestView, d: RouteDecision, header: str,
                       work: BodyWork | None) -> RoutePlan:
        """Inside Envoy AI Gateway the route stage is all there is: AIGW routes on ``header``
        and the body's model (the public name), and sets each backend's path and credentials;
        there is no attempt stage, so the body is prepared whole here, for the first candidate
        (parts reshaped, images described). None of our routing headers is set: nothing in
        AIGW reads them, and they would reach the backend."""
        set_headers = [(header, d.public_model), *self._hint_headers(d)]
        meta: dict[str, str] = {Meta.PUBLIC_MODEL: d.public_model}
        if d.warnings:
            meta[Meta.WARNINGS] = "; ".join(d.warnings)[:2000]
        named = {k for k, _ in set_headers}
        out = RoutePlan("direct", Cluster.DIRECT, set_headers,
                        [h for h in self.hint_headers if h not in named], meta,
                        work=replace(work, model=d.public_model) if work else None,
                        url_checks=d.url_checks)
        reserialise = drop_routing_keys(view.data, d) or view.reserialise
        out.body = new_body(view, d, d.public_model, reserialise, work)
        return out

    def _prepared(self, d: RouteDecision, unstored: bool, echo: dict[str, Any] | None
                  ) -> tuple[BackendRuntime, BodyWork | None] | None:
        """The one backend plan (and body work) every candidate would get, so the route stage
        prepares the request whole and no attempt stage is needed on the request side (one to
        three gRPC messages fewer per attempt); None when any two candidates differ. A request
        for another API is translated here too when every candidate is spoken to in the same
        one, alike, and what its answer repeats of it is small (it travels as metadata);
        otherwise each attempt translates. Inside Envoy AI Gateway (no attempt stage at all):
        the first candidate's, always."""
        cfg = self.config
        aig = cfg.ai_gateway.model_header
        whole_tx = not aig and bool(d.translated)
        if not aig and (not cfg.envoy.direct_cluster or (
                whole_tx and not self._translates_alike(d, echo))):
            return None
        common = common_backend(d.candidates, self.backends)
        if common is None and aig:
            common, d = self.backends[d.candidates[0].backend], replace(
                d, candidates=d.candidates[:1])
        elif common is None:
            return None
        if not d.sigs and not unstored and not whole_tx:  # plain text: nothing to adapt
            return common, None
        works = [self.body_work(t, d.sigs, unstored, d.endpoint, whole_tx)
                 for t in d.candidates]
        if all(w is None for w in works):
            return common, None
        profiles = {self.table.profiles[t.backend] for t in d.candidates}
        alike = len(profiles) == 1 and len({(w.substitute, w.drop_metadata) if w else None
                                            for w in works}) == 1
        return (common, works[0]) if alike else None

    def watches_answers(self, e: Endpoint) -> bool:
        """Whether the route stage asks Envoy for the answers' headers of requests to ``e`` (it
        must, before it has read the body): an API it may translate for some backend, in our
        own Envoy (a request it did not translate costs one message pair more)."""
        cfg = self.config
        return e.translator is not None and e.api in self.lacking and \
            cfg.envoy.direct_cluster and not cfg.ai_gateway.model_header

    def _translates_alike(self, d: RouteDecision, echo: dict[str, Any] | None) -> bool:
        """Every candidate spoken to in the same other API by the same kind of server, and
        the answer's echo of the request small enough for the hand-off."""
        return echo is not None and len(d.translated) == len(d.candidates) and \
            len({self.backends[t.backend].preset for t in d.candidates}) == 1 and \
            len(orjson.dumps(echo)) <= ECHO_MAX_BYTES

    def body_work(self, t: Target, sigs: list[Sig] | tuple[Sig, ...], unstored: bool,
                  endpoint: Endpoint = BY_PATH["/v1/chat/completions"], translated: bool = False
                  ) -> BodyWork | None:
        """The body work one backend needs: the same answer in both stages. A translated body
        is always work (it is rebuilt in the API the backend speaks)."""
        profile = self.table.profiles[t.backend]
        substitute = self.vision and any(s.kind == "image" for s in sigs) and \
            self.table.lacks(t, "vision")
        drop = unstored and profile.metadata == "with_store"
        if translated or substitute or drop or (sigs and needs_change(profile, list(sigs))):
            return BodyWork(t.backend, t.model, substitute, drop, endpoint, translated)
        return None

    # ------------------------------------------------------------ the attempt stage

    def attempt(self, handoff: HandOff, attempt: int, address: str, current_path: str,
                has_body: bool) -> AttemptPlan:
        """One attempt, from the hand-off and which endpoint it reached. Raises Refusal (a 502)
        when that endpoint is not one of the request's candidates."""
        picked = pick_candidate(handoff.candidates, attempt, address)
        if picked is None:
            raise refusal(502, f"attempt {attempt} reached {address}, which is not a candidate "
                          "for this request", code="unexpected_upstream", type="server_error")
        index, target = picked
        last = index >= len(handoff.candidates) - 1
        backend = self.backends[target.backend]
        e = handoff.endpoint
        translated = self.translated(e, target)
        path = target_path(backend, e, translated, handoff.path or current_path, target.model)
        plan = header_plan(backend, path, self.credentials, handoff.client_auth, current_path)
        if translated:  # its answer is rewritten: plain bytes
            plan.set.append(("accept-encoding", "identity"))
        work = self.body_work(target, handoff.sigs, handoff.unstored_metadata, e, translated)
        needs_body = has_body and (target.model != handoff.body_model or work is not None)
        return AttemptPlan(target, last, plan.set, plan.remove, handoff.body_model, work,
                           needs_body, translated or handoff.needs is not None or not last,
                           translated)

    def translated(self, e: Endpoint, t: Target) -> bool:
        """Whether ``t`` is spoken to in another API than the client's (it lacks that one)."""
        return e.via is not None and e.api not in self.table.apis[t.backend]

    # ------------------------------------------------------------ answers

    def response(self, status: int, headers: dict[str, str], end_of_stream: bool,
                 needs: Needs | None, last: bool, now_wall: float, translated: bool = False
                 ) -> ResponsePlan:
        """Whether to hold an answer (its headers wait for the body's verdict). While another
        candidate remains, a non-streaming answer is held until complete (a backend dying
        mid-answer is then a failed attempt Envoy retries). A stream is held, until its first
        deciding event, only when it is judged (a forced capability, fallback rules): holding
        costs a gRPC message per chunk for the rest of the stream (Envoy keeps streaming a
        body it started to send us), ~0.5 ms of service CPU per token, too much for every
        stream. Errors are held when judged (a capability gap may be named in them)."""
        rate_limited = status == 429
        retry_after = retry_after_seconds(headers.get("retry-after"), now_wall) \
            if rate_limited else None
        encoding = headers.get("content-encoding", "").strip().lower()
        inflate = unreadable = None
        if needs is not None and encoding not in ("", "identity"):
            if encoding in READABLE_ENCODINGS:  # judged decompressed, passed on as sent
                inflate = encoding
            else:  # a judged request never asks for it; a backend sent it anyway
                unreadable, needs = encoding, None
        stream = "text/event-stream" in headers.get("content-type", "")
        # A translated answer that is not a stream is translated whole; so is an error.
        complete = (not last or translated) and not stream and (status < 300 or translated)
        hold = not end_of_stream and (complete or (needs is not None and (
            (status == 200 and needs.judged) or status >= 400)))
        return ResponsePlan(hold, needs, stream, inflate, unreadable, rate_limited, retry_after,
                            translated)


def new_body(view: RequestView, d: RouteDecision, model_out: str | None, reserialise: bool,
             work: BodyWork | None) -> bytes | None:
    """The body as routed, when it changes and no body work will rebuild it (body work
    serialises the body it adapts, with the served model as its one key): re-serialised when
    its keys changed or its model key is not canonical, else the model name spliced in."""
    if work is not None:
        return None
    if reserialise:
        if model_out:
            view.data["model"] = model_out
        return orjson.dumps(view.data)
    if model_out:
        body_model = d.requested if d.resolution != "default" else None
        return set_model(view.body, body_model, model_out, view.headers.get("content-type", ""))
    return None


def drop_routing_keys(data: dict[str, Any], d: RouteDecision) -> bool:
    """Remove the hints' routing keys from the body's ``metadata`` (they never reach a
    backend); whether the body changed."""
    metadata = data.get("metadata")
    if not (d.hints.routing_keys and isinstance(metadata, dict)):
        return False
    rest = {k: v for k, v in metadata.items() if k not in d.hints.routing_keys}
    if rest:
        data["metadata"] = rest
    else:
        del data["metadata"]
    return True


@lru_cache(maxsize=4096)
def endpoint_list(cands: tuple[Target, ...]) -> str:
    """The override-host LB's per-request order: one ``IP:port`` per attempt (candidate lists
    repeat request after request: each is joined once)."""
    return ",".join(t.address for t in cands)


def verdict_headers(verdict: Verdict, last: bool) -> list[tuple[str, str]]:
    """What a judged answer's headers get: the retry trigger (Envoy tries the next
    candidate), or on the last candidate the reason it stands unmet."""
    if verdict.ok is not False:
        return []
    return [(RESP_UNMET if last else RETRY_HEADER, verdict.reason)]
