"""The two stream handlers: the route stage (once per client request, in the HCM) and the attempt
stage (once per upstream attempt, retries included). Each maps ext_proc messages to the core and
yields responses; ``Processor`` in service.py drives them and guarantees they never raise out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .. import metrics
from ..core.backends import (
    CLIENT_CREDENTIAL_HEADERS,
    BackendRuntime,
    client_credentials,
    common_backend,
    header_plan,
    pick_candidate,
    rewrite_model,
)
from ..core.capabilities import (
    READABLE_ENCODINGS,
    UNJUDGED,
    Inflater,
    Needs,
    StreamJudge,
    Verdict,
    capability_gap,
    judge_completion,
    readable_accept_encoding,
)
from ..core.decision import DecisionRecord
from ..core.errors import Reply, error_reply, internal_error, json_reply
from ..core.health import retry_after_seconds
from ..core.parts import ConvertError, Part, Profile, Sig, needs_change
from ..core.routing import (
    DIRECT_CLUSTER,
    JUDGED_CLUSTER,
    RouteDecision,
    Target,
    attempt_limits,
    check_request_line,
    decode_candidates,
    model_key,
    parse_json_body,
    route_request,
)
from ..effects.adapt import BodyAdapter
from ..effects.fetch import FetchError
from ..effects.vision import VisionError
from ..logs import log_event
from .protocol import (
    ATTR_ADDRESS,
    ATTR_ATTEMPT,
    ATTR_BODY_MODEL,
    ATTR_CANDIDATES,
    ATTR_CLIENT_AUTH,
    ATTR_NEEDS,
    ATTR_PARTS,
    ATTR_PATH,
    ATTR_REQUEST_ID,
    ATTR_UNSTORED_META,
    CLUSTER_HEADER,
    HEALTH_PATH,
    META_NS,
    PER_TRY_HEADER,
    RESP_BACKEND,
    RESP_MODEL,
    RESP_UNMET,
    RETRY_HEADER,
    STREAM_HEADER,
    TAG_META,
    attempt_mode,
    attribute_values,
    body_answer,
    extend_timeout,
    header_safe,
    headers_dict,
    immediate,
    mutation,
    struct,
)
from .runtime import Runtime

Out = AsyncIterator[pb.ProcessingResponse]


class RouteStream:
    """HCM-stage stream: one client request. Validates, routes, records the decision."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.path = self.raw_path = ""
        self.headers: dict[str, str] = {}
        self.record = DecisionRecord(request_id="-", decided_by=os.getpid())

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def respond(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | Out | None:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._on_headers(req.request_headers)
        if kind == "request_body":
            return self._on_body(req.request_body)
        return None

    def _answer(self, reply: Reply) -> pb.ProcessingResponse:
        """Answer the client ourselves; the record travels to the access log all the same."""
        out = immediate(reply)
        out.dynamic_metadata.CopyFrom(struct({META_NS: {"record": self.record.to_json()}}))
        return out

    def _reject(self, reply: Reply) -> pb.ProcessingResponse:
        self.record.rejected(reply.status, reply.code)
        return self._answer(reply)

    def _on_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = self.headers = headers_dict(msg)
        self.record.request_id = h.get("x-request-id", "-")
        method = h.get(":method", "")
        self.raw_path = h.get(":path", "")
        self.path = self.raw_path.split("?", 1)[0]
        self.record.method, self.record.path = method, self.path
        if method == "GET" and self.path == HEALTH_PATH:  # which backends are up, and why not
            self.record.outcome, self.record.status = "answered", 200
            return self._answer(json_reply(200, self.rt.health.snapshot(time.monotonic())))
        early = check_request_line(self.rt.table, method, self.path)
        if early is not None:
            if method == "GET" and early.status == 200:
                self.record.outcome, self.record.status = "answered", 200
                return self._answer(early)
            return self._reject(early)
        if msg.end_of_stream:
            return self._reject(error_reply(
                400, "The request has no body; expected a JSON object", code="invalid_json"))
        # Envoy honours some x-envoy-* request headers (timeouts, retries): never a client's;
        # nor our own names, nor what the config says no backend may see.
        strip = self.rt.strip_headers
        forged = [k for k in h if k in strip or k.startswith(("x-envoy-", "x-extproc-"))]
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(remove=forged)) if forged
            else None))

    def _on_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse | Out:
        data = parse_json_body(msg.body)
        if isinstance(data, Reply):
            return self._reject(data)
        reserialise = model_key(msg.body, data)
        if isinstance(reserialise, Reply):
            return self._reject(reserialise)
        model = data.get("model")
        self.record.model_requested = model if isinstance(model, str) else None
        decision = route_request(self.rt.table, data, self.headers, self.rt.health,
                                 time.monotonic())
        if isinstance(decision, Reply):
            return self._reject(decision)
        self.record.routed(decision)
        return self._routed(decision, data, msg.body, reserialise)

    def _prepared(self, d: RouteDecision, unstored: bool
                  ) -> tuple[BackendRuntime, BodyAdapter | None] | None:
        """The backend plan to apply here when no attempt could differ from another: such
        requests need no attempt stage on the request side (one to three messages fewer per
        attempt). With an adapter when the body must change beyond its model (images described,
        parts converted, metadata dropped), the same way for every candidate."""
        if not self.rt.config.envoy.direct_cluster or self.rt.config.ai_gateway.model_header:
            return None
        common = common_backend(d.candidates, self.rt.backends)
        if common is None:
            return None
        if not d.sigs and not unstored:  # plain text: one body for all, nothing to adapt
            return common, None
        table, first = self.rt.table, d.candidates[0]
        images = self.rt.vision is not None and any(s.kind == "image" for s in d.sigs)
        substitute = images and table.lacks(first, "vision")
        if images and any(table.lacks(t, "vision") != substitute for t in d.candidates[1:]):
            return None

        def changes(p: Profile) -> bool:
            return bool(d.sigs and needs_change(p, d.sigs)) or \
                (unstored and p.metadata == "with_store")

        profiles = {table.profiles[t.backend] for t in d.candidates}
        if len(profiles) > 1:  # the same body for all only when none changes it
            return None if substitute or any(map(changes, profiles)) else (common, None)
        (profile,) = profiles
        if not (substitute or changes(profile)):
            return common, None
        return common, BodyAdapter(self.rt, first.backend, first.model, substitute,
                                   unstored and profile.metadata == "with_store",
                                   self.request_id)

    def _routed(self, d: RouteDecision, data: dict[str, object], raw: bytes, reserialise: bool
                ) -> pb.ProcessingResponse | Out:
        """The answer to the body; an async iterator of answers when the body must be adapted
        here (that may wait on aux calls or fetches)."""
        rt = self.rt
        hcfg = rt.config.hints
        # What the body's model says now; the attempt stage rewrites it per backend.
        body_model = d.requested if d.resolution != "default" else None
        unstored = bool(data.get("metadata")) and data.get("store") is not True
        found = self._prepared(d, unstored)
        prepared, adapter = found if found is not None else (None, None)
        # Prepared whole here: straight to the backend, unless responses must be judged (a
        # forced capability) or held until complete (another candidate remains), which the
        # response side of the attempt stage does. Otherwise every attempt is adapted.
        cluster = d.cluster if prepared is None else \
            JUDGED_CLUSTER if d.needs.forced or len(d.candidates) > 1 else DIRECT_CLUSTER
        direct = prepared if cluster == DIRECT_CLUSTER else None
        self.record.plan = "direct" if direct else "judged" if prepared else "per_attempt"
        meta = {"hosts": d.hosts, "public_model": d.public_model,
                "route_reason": self.record.reason()}
        if not direct:  # what the attempt stage needs for each attempt
            meta["candidates"] = d.candidates_meta
            if d.needs.needed or d.needs.bad:
                meta["needs"] = d.needs.encode()
        if not prepared:
            if d.sigs:
                meta["parts"] = orjson.dumps([s.encode() for s in d.sigs]).decode()
            if unstored:
                meta["unstored_metadata"] = "1"
        if d.hints.policy:
            meta["intent"] = d.hints.policy
        set_headers = [(CLUSTER_HEADER, cluster),
                       ("x-envoy-max-retries", str(len(d.candidates) - 1))]
        attempt_s, idle_s = attempt_limits(rt.table, d)
        if data.get("stream") is True:  # Envoy's route for this silence limit
            set_headers.append((STREAM_HEADER, str(int(idle_s * 1000))))
        elif attempt_s is not None and attempt_s != rt.config.envoy.per_try_timeout_s:
            set_headers.append((PER_TRY_HEADER, str(int(attempt_s * 1000))))
        # Hint headers, the intent header and client copies of propagated headers never reach
        # a backend.
        remove = list(rt.hint_headers)
        for header, value in d.hints.context.items():
            if header in hcfg.propagate:
                set_headers.append((header, value))
        if d.hints.policy and hcfg.intent_header:  # (a client's own copy is always removed)
            set_headers.append((hcfg.intent_header, d.hints.policy))
        creds = client_credentials(self.headers)
        if prepared:
            plan = header_plan(prepared, self.raw_path, rt.credentials, creds)
            set_headers += plan.set
            remove += plan.remove
        else:  # each attempt sets its own backend's credentials and path from these
            remove += creds
            backends = [rt.backends[t.backend] for t in d.candidates]
            if creds and any(b.forward_client_auth and b.auth_value is None for b in backends):
                meta["client_auth"] = orjson.dumps(creds).decode()
            if any(b.base_path != "/v1" for b in backends):
                meta["path"] = self.raw_path
        accept = self.headers.get("accept-encoding")
        if accept and (d.needs.needed or d.needs.bad) and not direct:  # judged: readable ones
            readable = readable_accept_encoding(accept)
            if readable is None:
                remove.append("accept-encoding")
            elif readable != accept:
                set_headers.append(("accept-encoding", readable))
        named = {k for k, _ in set_headers}
        remove = [r for r in remove if r not in named]
        aig = rt.config.ai_gateway.model_header
        # The model the body must carry from here: AI Gateway routes on the canonical name; a
        # direct request is prepared whole, so it names the backend's model now; so does one
        # whose candidates all serve the same name (the attempt stage then skips the body
        # unless a part needs reshaping: one message fewer before the backend is reached).
        # (A prepared request's candidates always serve one name.)
        served = d.candidates[0].model
        uniform = all(t.model == served for t in d.candidates)
        model_out = d.public_model if aig else served if uniform else None
        new_body: bytes | None = None
        metadata = data.get("metadata")
        if d.hints.routing_keys and isinstance(metadata, dict):
            rest = {k: v for k, v in metadata.items() if k not in d.hints.routing_keys}
            if rest:
                data["metadata"] = rest
            else:
                del data["metadata"]
            reserialise = True
        # (An adapter serialises the body it adapts, with the served model as its one key.)
        if reserialise and adapter is None:  # one canonical model key: the body as routed
            if model_out:
                data["model"] = model_out
            new_body = orjson.dumps(data)
        elif model_out and adapter is None:
            new_body = rewrite_model(raw, body_model, model_out)
        if not prepared:
            meta["body_model"] = orjson.dumps(model_out or body_model).decode()
        if direct:  # no attempt stage will name the backend: Envoy's route adds these
            meta["backend"], meta["model"] = d.candidates[0].backend, d.candidates[0].model
        if d.warnings:
            meta["warnings"] = header_safe("; ".join(d.warnings)[:2000])  # a response header
        if aig:  # Envoy AI Gateway routes on this header and the body's model
            set_headers.append((aig, d.public_model))
        if adapter is not None or d.url_checks:
            return self._completed(d.url_checks, adapter, data, d.parts, set_headers, remove,
                                   meta, new_body)
        return self._body_answer(set_headers, remove, new_body, meta)

    def _body_answer(self, set_headers: list[tuple[str, str]], remove: list[str],
                     body: bytes | None, meta: dict[str, str]) -> pb.ProcessingResponse:
        if body is not None:
            set_headers.append(("content-length", str(len(body))))
        meta["record"] = self.record.to_json()
        return body_answer(set_headers, remove, body, meta, clear_route_cache=True)

    async def _completed(self, checks: list[tuple[str, str]], adapter: BodyAdapter | None,
                         data: dict[str, Any], parts: list[Part],
                         set_headers: list[tuple[str, str]], remove: list[str],
                         meta: dict[str, str], body: bytes | None) -> Out:
        """The answer once what waits on the network is done: URLs a backend will fetch itself
        checked against the fetch policy, then the body adapted once for every candidate (what
        was done travels as metadata, for Envoy's route to tell the client)."""
        try:
            if checks:  # within Envoy's message timeout: no extension message for a lookup
                limit = 0.8 * self.rt.config.envoy.message_timeout_ms / 1000
                await asyncio.gather(*(self.rt.fetcher.check(url, param, limit)
                                       for url, param in checks))
            if adapter is not None:
                wait = adapter.plan(data, parts)
                if wait:
                    yield extend_timeout(wait)
                body = await adapter.run()
                for header, value in adapter.tags:
                    meta[TAG_META[header]] = value
        except (ConvertError, FetchError, VisionError) as exc:
            yield self._reject(adapter.refusal(exc) if adapter is not None else exc.reply)
            return
        yield self._body_answer(set_headers, remove, body, meta)

    def fail(self) -> pb.ProcessingResponse:
        self.record.rejected(500, "internal_error")
        return self._answer(internal_error(self.record.request_id))


class AttemptStream:
    """Upstream-stage stream: one attempt at one backend (every retry is a new stream)."""

    def __init__(self, rt: Runtime, log: Any):
        self.rt, self.log = rt, log
        self.request_id = "-"
        self.backend: str | None = None
        self.model: str | None = None
        self.target: Target | None = None
        self.body_model: str | None = None
        self.convert = False      # some part needs reshaping/fetching for this backend
        self.substitute = False   # images must be described: this model cannot see
        self.drop_metadata = False  # the backend takes `metadata` only with `store: true`
        self.tags: list[tuple[str, str]] = []
        self.needs: Needs | None = None
        self.attempt = 1
        self.last = True          # the final candidate: a failed check cannot be retried
        # Response hold while judging a forced need.
        self.holding = False
        self.status = 0
        self.held = 0
        self.held_bytes = bytearray()
        self.hold_since = 0.0
        self.judge: StreamJudge | None = None
        self.inflater: Inflater | None = None  # a compressed answer, for the judge

    async def handle(self, req: pb.ProcessingRequest) -> Out:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            yield self._on_headers(req)
        elif kind == "request_body":
            async for out in self._on_body(req.request_body):
                yield out
        elif kind == "response_headers":
            if self.backend is None:  # the judged cluster: no request side, attributes now
                refused = self._reached(attribute_values(req))
                if refused is not None:
                    yield refused
                    return
            async for out in self._on_response_headers(req.response_headers):
                yield out
        elif kind == "response_body":
            async for out in self._on_response_body(req.response_body):
                yield out

    def _reached(self, attrs: dict[str, object]) -> pb.ProcessingResponse | None:
        """Which candidate this attempt reached (and what it must deliver); an answer when it
        cannot be told."""
        request_id = attrs.get(ATTR_REQUEST_ID)
        if isinstance(request_id, str) and request_id:
            self.request_id = request_id
        address = str(attrs.get(ATTR_ADDRESS) or "")
        attempt = int(float(attrs.get(ATTR_ATTEMPT) or 1))
        meta = attrs.get(ATTR_CANDIDATES)
        if not isinstance(meta, str) or not meta:
            return immediate(error_reply(
                502, "request reached a backend without a routing decision (is the route-stage "
                "ext_proc filter installed?)", code="no_routing_decision", type="server_error"))
        candidates = decode_candidates(meta)
        picked = pick_candidate(candidates, attempt, address)
        if picked is None:
            return immediate(error_reply(
                502, f"attempt {attempt} reached {address}, which is not a candidate for this "
                "request", code="unexpected_upstream", type="server_error"))
        self.target = target = picked[1]
        self.backend, self.model = target.backend, target.model
        self.attempt, self.last = attempt, picked[0] >= len(candidates) - 1
        raw_needs = attrs.get(ATTR_NEEDS)
        if isinstance(raw_needs, str) and raw_needs:
            self.needs = Needs.decode(raw_needs)
        return None

    def _on_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        h = headers_dict(req.request_headers)
        self.request_id = h.get("x-request-id", "-")
        attrs = attribute_values(req)
        refused = self._reached(attrs)
        if refused is not None:
            return refused
        target = self.target
        assert target is not None
        raw_model = attrs.get(ATTR_BODY_MODEL)
        self.body_model = orjson.loads(raw_model) if isinstance(raw_model, str) else None
        current, path = h.get(":path", ""), attrs.get(ATTR_PATH)
        raw_auth = attrs.get(ATTR_CLIENT_AUTH)
        client_auth = {k: v for k, v in orjson.loads(raw_auth).items() if
                       k in CLIENT_CREDENTIAL_HEADERS and isinstance(v, str)} \
            if isinstance(raw_auth, str) and raw_auth else {}
        plan = header_plan(self.rt.backends[target.backend],
                           path if isinstance(path, str) and path else current,
                           self.rt.credentials, client_auth, current)
        raw_parts = attrs.get(ATTR_PARTS)
        if isinstance(raw_parts, str) and raw_parts:
            sigs = [Sig.decode(x) for x in orjson.loads(raw_parts)]
            self.substitute = (self.rt.vision is not None
                               and any(s.kind == "image" for s in sigs)
                               and self.rt.table.lacks(target, "vision"))
            self.convert = self.substitute or needs_change(
                self.rt.table.profiles[target.backend], sigs)
        if attrs.get(ATTR_UNSTORED_META) and \
                self.rt.table.profiles[target.backend].metadata == "with_store":
            self.drop_metadata = self.convert = True
        needs_body = (target.model != self.body_model or self.convert) \
            and not req.request_headers.end_of_stream
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=mutation(plan.set, plan.remove))),
            mode_override=attempt_mode(needs_body, self.needs is not None or not self.last),
        )

    # ------------------------------------------------------------ response judging

    def _headers_answer(self, extra: list[tuple[str, str]] | None = None
                        ) -> pb.ProcessingResponse:
        tags = [(RESP_BACKEND, self.backend or ""), (RESP_MODEL, self.model or ""), *self.tags,
                *(extra or [])]
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(tags))))

    async def _on_response_headers(self, msg: pb.HttpHeaders) -> Out:
        h = headers_dict(msg)
        try:
            self.status = int(h.get(":status", "0"))
        except ValueError:
            self.status = 0
        if self.status == 429:
            self._rate_limited(h.get("retry-after"))
        needs = self.needs
        encoding = h.get("content-encoding", "").strip().lower()
        if needs is not None and encoding not in ("", "identity"):
            if encoding in READABLE_ENCODINGS:  # judged as decompressed, passed on as sent
                self.inflater = Inflater(encoding, self.rt.config.capability_routing
                                         .hold_max_bytes)
            else:  # a judged request never asks for it; a backend sent it anyway
                log_event(self.log, {"event": "capability.unjudged", "request_id":
                                     self.request_id, "backend": self.backend,
                                     "why": f"content-encoding {encoding[:40]!r}"})
                needs = self.needs = None
        streaming = "text/event-stream" in h.get("content-type", "")
        # While another candidate remains, hold a non-streaming answer until it is complete:
        # a backend dying mid-answer is then a failed attempt Envoy retries. A stream is held
        # (until its first deciding event) only when it is judged: a forced capability, or
        # the model's fallback_on rules. Holding costs a service message per chunk for the
        # rest of the stream (Envoy keeps streaming a body it started to send us), ~0.5 ms
        # of CPU per token, too much for every stream.
        complete = not self.last and not streaming and self.status < 300
        hold = not msg.end_of_stream and (complete or (needs is not None and (
            (self.status == 200 and needs.judged) or self.status >= 400)))
        if not hold:
            out = self._headers_answer()
            # Nothing to judge: no body messages for this response.
            out.mode_override.CopyFrom(attempt_mode(False, False))
            yield out
            return
        self.holding, self.hold_since = True, time.monotonic()
        if needs is not None and self.status == 200 and streaming:
            self.judge = StreamJudge(needs)
        yield extend_timeout(self.rt.config.capability_routing.hold_max_s)

    def _rate_limited(self, retry_after: str | None) -> None:
        """A 429: Envoy tries the next candidate now (a retriable status); this backend cools
        down for its Retry-After, so that later requests skip it meanwhile."""
        seconds = retry_after_seconds(retry_after, time.time())
        if seconds and self.backend:
            self.rt.health.retry_after(self.backend, seconds, time.monotonic(), time.time())
        if not self.last:  # else the 429 is the client's answer, not a retry
            self._note_retry("rate_limited: 429" +
                             (f", Retry-After {seconds:.0f}s" if seconds else ""))

    def _note_retry(self, reason: str) -> None:
        """A retry (or, on the last candidate, an answer left as it is) and its reason: a log
        line, a metric, and the request's decision record (``capability_retries``)."""
        metrics.ATTEMPT_RETRIES.labels(reason.split(":", 1)[0], self.backend or "-",
                                       str(not self.last).lower()).inc()
        self.rt.note(self.request_id, {"attempt": self.attempt, "backend": self.backend,
                                       "model": self.model, "reason": reason,
                                       "retried": not self.last})
        log_event(self.log, {"event": "capability.retry" if not self.last else
                             "capability.unmet", "request_id": self.request_id,
                             "attempt": self.attempt, "backend": self.backend,
                             "model": self.model, "reason": reason})

    async def _on_response_body(self, msg: pb.HttpBody) -> Out:
        if not self.holding:
            yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            return
        self.held += 1
        verdict: Verdict | None = None
        body = msg.body if self.inflater is None else self.inflater.feed(msg.body)
        if body is None:
            verdict = UNJUDGED  # corrupt, or it inflates past the hold limit
        elif self.judge is not None:
            verdict = self.judge.feed(body, msg.end_of_stream)
        else:
            self.held_bytes += body
            if msg.end_of_stream:
                verdict = await self._judge_whole(bytes(self.held_bytes))
        cfg = self.rt.config.capability_routing
        if verdict is None and (len(self.held_bytes) > cfg.hold_max_bytes
                                or (self.judge and len(self.judge.buf) > cfg.hold_max_bytes)
                                or time.monotonic() - self.hold_since > cfg.hold_max_s):
            verdict = UNJUDGED  # bounded: release what we hold, never fail on doubt
        if verdict is None:
            return
        self.holding = False
        yield self._headers_answer(self._verdict_headers(verdict))
        for _ in range(self.held):
            yield pb.ProcessingResponse(response_body=pb.BodyResponse())

    async def _judge_whole(self, body: bytes) -> Verdict:
        if self.needs is None:
            return UNJUDGED  # held only to be complete before the router sees it
        if self.status == 200:
            verdict = judge_completion(body, self.needs)
            if verdict.schema_values and self.needs.schema is not None:
                verdict = await self.rt.schema_judge.judge(self.needs.schema,
                                                           verdict.schema_values)
            return verdict
        gap = capability_gap(self.status, body)
        return Verdict(False, f"{gap}: the backend's error says the model lacks it") if gap \
            else UNJUDGED

    def _verdict_headers(self, verdict: Verdict) -> list[tuple[str, str]]:
        if verdict.ok is not False:
            return []
        self._note_retry(verdict.reason)
        if self.last:
            return [(RESP_UNMET, verdict.reason)]
        return [(RETRY_HEADER, verdict.reason)]

    async def _on_body(self, msg: pb.HttpBody) -> Out:
        assert self.model is not None and self.backend is not None
        if not self.convert:
            new = rewrite_model(msg.body, self.body_model, self.model)
            yield body_answer([("content-length", str(len(new)))], [], new) if new is not None \
                else pb.ProcessingResponse(request_body=pb.BodyResponse())
            return
        adapter = BodyAdapter(self.rt, self.backend, self.model, self.substitute,
                              self.drop_metadata, self.request_id)
        try:
            wait = adapter.plan(orjson.loads(msg.body))
            if wait:
                yield extend_timeout(wait)
            new = await adapter.run()
        except (ConvertError, FetchError, VisionError) as exc:
            yield immediate(adapter.refusal(exc))
            return
        self.tags += adapter.tags
        yield body_answer([("content-length", str(len(new)))], [], new)

    def fail(self) -> pb.ProcessingResponse:
        return immediate(internal_error(self.request_id))
