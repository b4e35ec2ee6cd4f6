"""The two stream handlers: the route stage (once per client request, in the HCM) and the attempt
stage (once per upstream attempt, retries included). Each maps ext_proc messages to the core and
yields responses; ``Processor`` in service.py drives them and guarantees they never raise out.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import duration_pb2

from . import metrics
from .attempt import BackendRuntime, common_backend, header_plan, pick_candidate, rewrite_model
from .capabilities import UNJUDGED, Needs, StreamJudge, Verdict, capability_gap, judge_completion
from .decision import DecisionRecord
from .errors import Reply, error_reply, internal_error
from .fetch import FetchError
from .logs import log_event
from .messages import (
    ATTR_ADDRESS,
    ATTR_ATTEMPT,
    ATTR_BODY_MODEL,
    ATTR_CANDIDATES,
    ATTR_NEEDS,
    ATTR_PARTS,
    ATTR_REQUEST_ID,
    ATTR_UNSTORED_META,
    CLUSTER_HEADER,
    META_NS,
    RESP_BACKEND,
    RESP_CONVERTED,
    RESP_MODEL,
    RESP_UNMET,
    RESP_VISION,
    RETRY_HEADER,
    attempt_mode,
    attribute_values,
    body_answer,
    headers_dict,
    immediate,
    mutation,
    struct,
)
from .parts import (
    ConvertError,
    Part,
    PartsReport,
    Sig,
    convert_body,
    fetch_targets,
    inspect_parts,
    needs_change,
)
from .routing import (
    DIRECT_CLUSTER,
    JUDGED_CLUSTER,
    RouteDecision,
    Target,
    check_request_line,
    decode_candidates,
    parse_json_body,
    route_request,
)
from .runtime import Runtime
from .vision import VisionError, failure_text, substitution_text

Out = AsyncIterator[pb.ProcessingResponse]


class RouteStream:
    """HCM-stage stream: one client request. Validates, routes, records the decision."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.path = ""
        self.headers: dict[str, str] = {}
        self.record = DecisionRecord(request_id="-", decided_by=os.getpid())

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def respond(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
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
        self.path = h.get(":path", "").split("?", 1)[0]
        self.record.method, self.record.path = method, self.path
        early = check_request_line(self.rt.table, method, self.path)
        if early is not None:
            if method == "GET" and early.status == 200:
                self.record.outcome, self.record.status = "answered", 200
                return self._answer(early)
            return self._reject(early)
        if msg.end_of_stream:
            return self._reject(error_reply(
                400, "The request has no body; expected a JSON object", code="invalid_json"))
        # Envoy honours some x-envoy-* request headers (timeouts, retries): never a client's.
        forged = [k for k in h if k.startswith("x-envoy-")]
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(remove=forged)) if forged
            else None))

    def _on_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        data = parse_json_body(msg.body)
        if isinstance(data, Reply):
            return self._reject(data)
        model = data.get("model")
        self.record.model_requested = model if isinstance(model, str) else None
        decision = route_request(self.rt.table, data, self.headers)
        if isinstance(decision, Reply):
            return self._reject(decision)
        self.record.routed(decision)
        return self._routed(decision, data, msg.body)

    def _prepared(self, d: RouteDecision, unstored: bool) -> BackendRuntime | None:
        """The backend plan to apply here when no attempt could differ from another: such
        requests need no attempt stage on the request side (one message fewer per attempt)."""
        if not self.rt.config.envoy.direct_cluster or self.rt.config.ai_gateway.model_header:
            return None
        common = common_backend(d.candidates, self.rt.backends)
        if common is None:
            return None
        table, images = self.rt.table, any(s.kind == "image" for s in d.sigs)
        for t in d.candidates:
            profile = table.profiles[t.backend]
            if (d.sigs and needs_change(profile, d.sigs)) or \
                    (images and self.rt.vision is not None and table.lacks(t, "vision")) or \
                    (unstored and profile.metadata == "with_store"):
                return None
        return common

    def _routed(self, d: RouteDecision, data: dict[str, object], raw: bytes
                ) -> pb.ProcessingResponse:
        rt = self.rt
        hcfg = rt.config.hints
        # What the body's model says now; the attempt stage rewrites it per backend.
        body_model = d.requested if d.resolution != "default" else None
        unstored = bool(data.get("metadata")) and data.get("store") is not True
        prepared = self._prepared(d, unstored)
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
            if d.needs.needed:
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
        # Hint headers and client copies of propagated headers never reach a backend.
        remove = list(rt.hint_headers)
        for header, value in d.hints.context.items():
            if header in hcfg.propagate:
                set_headers.append((header, value))
        if d.hints.policy and hcfg.intent_header:
            set_headers.append((hcfg.intent_header, d.hints.policy))
            remove.append(hcfg.intent_header)
        if prepared:
            plan = header_plan(prepared, self.path)
            set_headers += plan.set
            remove += plan.remove
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
            if model_out:
                data["model"] = model_out
            new_body = orjson.dumps(data)
        elif model_out:
            new_body = rewrite_model(raw, body_model, model_out)
        if not prepared:
            meta["body_model"] = orjson.dumps(model_out or body_model).decode()
        if direct:  # no attempt stage will name the backend: Envoy's route adds these
            meta["backend"], meta["model"] = d.candidates[0].backend, d.candidates[0].model
        if d.warnings:
            meta["warnings"] = "; ".join(d.warnings)[:2000]
        if aig:  # Envoy AI Gateway routes on this header and the body's model
            set_headers.append((aig, d.public_model))
        if new_body is not None:
            set_headers.append(("content-length", str(len(new_body))))
        meta["record"] = self.record.to_json()
        return body_answer(set_headers, remove, new_body, meta, clear_route_cache=True)

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
        plan = header_plan(self.rt.backends[target.backend], h.get(":path", ""))
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
        needs = self.needs
        streaming = "text/event-stream" in h.get("content-type", "")
        # Hold a non-streaming answer until it is complete while another candidate remains: a
        # backend dying mid-response is then a reset before headers, which Envoy retries.
        complete = not self.last and not streaming and self.status < 300
        hold = not msg.end_of_stream and (complete or (needs is not None and (
            (self.status == 200 and bool(needs.forced)) or self.status >= 400)))
        if not hold:
            out = self._headers_answer()
            # Nothing to judge: no body messages for this response.
            out.mode_override.CopyFrom(attempt_mode(False, False))
            yield out
            return
        self.holding, self.hold_since = True, time.monotonic()
        if needs is not None and self.status == 200 and streaming:
            self.judge = StreamJudge(needs)
        limit = self.rt.config.capability_routing.hold_max_s
        yield pb.ProcessingResponse(override_message_timeout=duration_pb2.Duration(
            seconds=int(limit), nanos=int((limit % 1) * 1e9)))

    async def _on_response_body(self, msg: pb.HttpBody) -> Out:
        if not self.holding:
            yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            return
        self.held += 1
        verdict: Verdict | None
        if self.judge is not None:
            verdict = self.judge.feed(msg.body, msg.end_of_stream)
        else:
            self.held_bytes += msg.body
            verdict = None
            if msg.end_of_stream:
                verdict = self._judge_whole(bytes(self.held_bytes))
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

    def _judge_whole(self, body: bytes) -> Verdict:
        if self.needs is None:
            return UNJUDGED  # held only to be complete before the router sees it
        if self.status == 200:
            return judge_completion(body, self.needs)
        gap = capability_gap(self.status, body)
        return Verdict(False, f"{gap}: the backend's error says the model lacks it") if gap \
            else UNJUDGED

    def _verdict_headers(self, verdict: Verdict) -> list[tuple[str, str]]:
        if verdict.ok is not False:
            return []
        metrics.ATTEMPT_RETRIES.labels(verdict.reason.split(":", 1)[0], self.backend or "-",
                                       str(not self.last).lower()).inc()
        self.rt.note(self.request_id, {"attempt": self.attempt, "backend": self.backend,
                                       "model": self.model, "reason": verdict.reason,
                                       "retried": not self.last})
        log_event(self.log, {"event": "capability.retry" if not self.last else
                             "capability.unmet", "request_id": self.request_id,
                             "attempt": self.attempt, "backend": self.backend,
                             "model": self.model, "reason": verdict.reason})
        if self.last:
            return [(RESP_UNMET, verdict.reason)]
        return [(RETRY_HEADER, verdict.reason)]

    async def _on_body(self, msg: pb.HttpBody) -> Out:
        assert self.model is not None and self.backend is not None
        if self.substitute:
            # Aux calls may outlast the per-message timeout: extend it first.
            assert self.rt.vision is not None
            limit = self.rt.config.envoy.max_message_timeout_ms / 1000
            wait = min(self.rt.vision.cfg.timeout_s * 2 + 5, limit)
            yield pb.ProcessingResponse(override_message_timeout=duration_pb2.Duration(
                seconds=int(wait), nanos=int((wait % 1) * 1e9)))
        if self.convert:
            try:
                new: bytes | None = await self._convert(msg.body)
            except (ConvertError, FetchError) as exc:
                yield immediate(exc.reply)
                return
            except VisionError as exc:
                assert self.rt.vision is not None
                yield immediate(exc.reply(self.rt.vision.cfg.model))
                return
        else:
            new = rewrite_model(msg.body, self.body_model, self.model)
        if new is None:
            yield pb.ProcessingResponse(request_body=pb.BodyResponse())
            return
        yield body_answer([("content-length", str(len(new)))], [], new)

    async def _convert(self, body: bytes) -> bytes:
        """Parse once, describe/fetch/convert what this backend needs, serialise once."""
        assert self.backend is not None
        data = orjson.loads(body)
        report = inspect_parts(data, validate=False)  # the route stage validated this body
        if self.substitute:
            await self._substitute_images(data, report)
        profile = self.rt.table.profiles[self.backend]
        targets = fetch_targets(profile, report)
        fetched: dict[str, tuple[str, bytes]] = {}
        if targets:
            fetched = await self._fetch_all(targets)
        converted = convert_body(data, report, profile, fetched)
        if converted:
            self.tags.append((RESP_CONVERTED, str(converted)))
            metrics.PART_CONVERSIONS.labels(self.backend).inc(converted)
        if self.drop_metadata:
            data.pop("metadata", None)
        data["model"] = self.model
        return orjson.dumps(data)

    async def _fetch_all(self, parts: list[Part]) -> dict[str, tuple[str, bytes]]:
        urls = list(dict.fromkeys(p.url for p in parts if p.url))
        where = {p.url: p.path for p in parts}
        results = await asyncio.gather(*(self.rt.fetcher.fetch(u, where[u]) for u in urls))
        return dict(zip(urls, results, strict=True))

    async def _substitute_images(self, data: dict[str, Any], report: PartsReport) -> None:
        """Replace every image, in place, by a text part describing it (or saying it failed)."""
        vision = self.rt.vision
        assert vision is not None and self.model is not None
        images = [p for p in report.parts if p.sig.kind == "image"]
        remote = [p for p in images if p.sig.source in ("http", "https")]
        fetched = await self._fetch_all(remote) if remote else {}

        def user_text(msg_index: int) -> str:
            content = data["messages"][msg_index].get("content")
            return " ".join(p.get("text", "") for p in content if isinstance(p, dict)
                            and isinstance(p.get("text"), str)) if isinstance(content, list) else ""

        async def one(p: Part) -> tuple[str, bool] | VisionError:
            if p.b64 is not None:
                mime, raw = p.mime or "image/png", base64.b64decode(p.b64)
            else:
                mime, raw = fetched[p.url or ""]
            try:
                return await vision.describe(raw, mime, vision.prompt_for(user_text(p.msg)))
            except VisionError as exc:
                return exc

        results = await asyncio.gather(*(one(p) for p in images))
        cached = 0
        for n, (p, res) in enumerate(zip(images, results, strict=True), start=1):
            if isinstance(res, VisionError):
                if vision.cfg.on_failure == "reject":
                    raise res
                text = failure_text(n, vision.cfg.model, res.message)
            else:
                text = substitution_text(n, vision.cfg.model, self.model, res[0])
                cached += res[1]
            data["messages"][p.msg]["content"][p.idx] = {"type": "text", "text": text}
        report.parts = [p for p in report.parts if p.sig.kind != "image"]
        failed = sum(isinstance(r, VisionError) for r in results)
        aux = vision.cfg.model
        metrics.VISION.labels(aux, "described").inc(len(images) - failed - cached)
        metrics.VISION.labels(aux, "cached").inc(cached)
        metrics.VISION.labels(aux, "failed").inc(failed)
        self.tags.append((RESP_VISION, f"substituted={len(images) - failed}; cached={cached}; "
                                       f"failed={failed}; model={vision.cfg.model}"))

    def fail(self) -> pb.ProcessingResponse:
        return immediate(internal_error(self.request_id))
