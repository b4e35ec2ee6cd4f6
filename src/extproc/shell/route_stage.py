"""The route stage's stream: one client request, in the HCM before the router.

Decodes Envoy's messages, asks the core (routing), the planner (what Envoy is told) and the
effects (URL checks, body work), and encodes the answers. Every decision is a call into the
core; ``Processor`` (``server.py``) drives it and guarantees it never raises out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..contract import HEALTH_PATH, META_NS, RESP_TRANSLATED, TAG_META, Meta, header_safe
from ..core.decision import DecisionRecord
from ..core.endpoints import (
    BY_PATH,
    Endpoint,
    StreamTranslator,
    in_envelope,
    translated_whole,
)
from ..core.errors import Refusal, Reply, internal_error, json_reply
from ..core.form import parse_form, set_text
from ..core.parts import Part
from ..core.plan import RequestView, RoutePlan
from ..core.routing import check_request_line, model_key, parse_json_body, route_request
from ..effects.adapt import BodyAdapter
from ..runtime import Runtime
from .adapting import adapt
from .protocol import (
    answer_status,
    body_answer,
    headers_dict,
    immediate,
    mutation,
    response_chunk,
    route_mode,
    struct,
)

Out = AsyncIterator[pb.ProcessingResponse]


class RouteStream:
    """One client request: validated, routed, planned; its decision record travels with it."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.path = self.raw_path = self.method = ""
        self.headers: dict[str, str] = {}
        self.record = DecisionRecord(request_id="-", decided_by=os.getpid())
        self.endpoint: Endpoint = BY_PATH["/v1/chat/completions"]
        self.path_model: str | None = None  # the model an Azure-style path names
        # Translated whole for its one candidate: the answer comes back through this stream
        # to be translated (``plan.answer_echo``), whole or as a live stream.
        self.answer_echo: dict[str, Any] | None = None
        self.answer_status = 0
        self.answer_stream: StreamTranslator | None = None

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def respond(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | Out | None:
        """The answer to one message; an async iterator of answers when it must wait on the
        network first (URL checks, body work)."""
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._on_headers(req.request_headers)
            if kind == "request_body":
                return self._on_body(req.request_body)
            if kind == "response_headers":
                return self._on_answer_headers(req.response_headers)
            if kind == "response_body":
                return self._on_answer_body(req.response_body)
        except Refusal as refused:
            return self._reject(refused.reply)
        return None

    def _answer(self, reply: Reply) -> pb.ProcessingResponse:
        """Answer the client ourselves, in its API's envelope; the record travels to the access
        log all the same."""
        out = immediate(in_envelope(self.endpoint, reply))
        out.dynamic_metadata.CopyFrom(struct({META_NS: {Meta.RECORD: self.record.to_json()}}))
        return out

    def _reject(self, reply: Reply) -> pb.ProcessingResponse:
        self.record.rejected(reply.status, reply.code)
        return self._answer(reply)

    def _on_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = self.headers = headers_dict(msg)
        self.record.request_id = h.get("x-request-id", "-")
        self.method = h.get(":method", "")
        self.raw_path = h.get(":path", "")
        self.path = self.raw_path.split("?", 1)[0]
        self.record.method, self.record.path = self.method, self.path
        if self.method == "GET" and self.path == HEALTH_PATH:  # which backends are up, why not
            return self._answered(json_reply(200, self.rt.health.snapshot(time.monotonic())))
        early = check_request_line(self.rt.table, self.method, self.path,
                                   not msg.end_of_stream, self.rt.health, time.monotonic())
        if isinstance(early, Reply):
            return self._answered(early)
        self.endpoint, self.path_model = early
        self.record.api = self.endpoint.api.value
        stripped = self.rt.planner.stripped(h)
        out = pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(remove=stripped)) if stripped
            else None))
        if self.rt.planner.watches_answers(self.endpoint):  # (only now can it be asked for)
            out.mode_override.CopyFrom(route_mode())
        return out

    def _answered(self, reply: Reply) -> pb.ProcessingResponse:
        self.record.outcome, self.record.status = "answered", reply.status
        return self._answer(reply)

    def _on_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse | Out:
        body, reserialise, renamed = msg.body, False, False
        if self.endpoint.form:  # an upload: its small fields, the file left as it is
            ctype = self.headers.get("content-type", "")
            form = parse_form(body, ctype)
            if self.path_model is not None:
                body, renamed = set_text(body, form, "model", self.path_model), True
                form = parse_form(body, ctype)
            data: dict[str, Any] = {"model": form.text(body, "model") or None,
                                    "stream": form.text(body, "stream") == "true"}
        else:
            data = parse_json_body(body)
            reserialise = model_key(body, data)
            if self.path_model is not None:  # Azure-style: the path names the model
                data["model"], reserialise = self.path_model, True
        model = data.get("model")
        self.record.model_requested = model if isinstance(model, str) else None
        decision = route_request(self.rt.table, data, self.headers, self.rt.health,
                                 time.monotonic(), endpoint=self.endpoint)
        self.record.routed(decision)
        plan = self.rt.planner.route(
            RequestView(self.method, self.raw_path, self.headers, body, data, reserialise),
            decision)
        if plan.body is None and plan.work is None and renamed:
            plan.body = body  # an Azure-style upload now names its model
        self.record.plan = plan.kind
        if plan.url_checks:
            return self._completed(plan, data, decision.parts)
        if plan.work is not None:
            adapter = BodyAdapter(self.rt, plan.work, self.request_id)
            wait = adapter.plan(data, decision.parts)
            if adapter.at_once():  # (answered in this read: no task, no turn of the loop)
                return self._adapted(plan, adapter, adapter.run_now())
            return self._adapting(plan, adapter, wait)
        return self._body_answer(plan, plan.body)

    def _body_answer(self, plan: RoutePlan, body: bytes | None) -> pb.ProcessingResponse:
        self.answer_echo = plan.answer_echo
        meta = plan.metadata
        if Meta.WARNINGS in meta:  # it becomes a response header
            meta[Meta.WARNINGS] = header_safe(meta[Meta.WARNINGS])
        meta[Meta.ROUTE_REASON] = self.record.reason()
        meta[Meta.RECORD] = self.record.to_json()
        set_headers = plan.set_headers
        if body is not None:
            set_headers = [*set_headers, ("content-length", str(len(body)))]
        return body_answer(set_headers, plan.remove_headers, body, meta, clear_route_cache=True)

    async def _completed(self, plan: RoutePlan, data: dict[str, Any], parts: list[Part]) -> Out:
        """The answer once URLs a backend will fetch itself are checked against the fetch
        policy (within Envoy's message timeout: no extension for a lookup), then the body
        work."""
        try:
            limit = 0.8 * self.rt.config.envoy.message_timeout_ms / 1000
            await asyncio.gather(*(self.rt.fetcher.check(url, param, limit)
                                   for url, param in plan.url_checks))
            if plan.work is None:
                yield self._body_answer(plan, plan.body)
                return
            adapter = BodyAdapter(self.rt, plan.work, self.request_id)
            wait = adapter.plan(data, parts)
        except Refusal as refused:
            yield self._reject(refused.reply)
            return
        async for out in self._adapting(plan, adapter, wait):
            yield out

    async def _adapting(self, plan: RoutePlan, adapter: BodyAdapter, wait: float) -> Out:
        """Body work as a task (it waits on the network: aux calls, fetches, audio decoded off
        the loop; or it follows URL checks that did), done once for every candidate."""
        try:
            async for extension in adapt(adapter, wait):
                yield extension
        except Refusal as refused:
            yield self._reject(refused.reply)
            return
        yield self._adapted(plan, adapter, adapter.body)

    def _adapted(self, plan: RoutePlan, adapter: BodyAdapter, body: bytes
                 ) -> pb.ProcessingResponse:
        """What was done travels as metadata, for Envoy's route to tell the client."""
        for header, value in adapter.tags:
            plan.metadata[TAG_META[header]] = value
        return self._body_answer(plan, body)

    # ------------------------------------------------------------ answers (translated only)

    def _on_answer_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        """Passed as they are, unless this stage translated the request: then tagged, their
        length dropped, and the body asked for (whole, or chunk by chunk for a stream)."""
        out = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        translator = self.endpoint.translator
        if self.answer_echo is None or translator is None:
            return out
        h = headers_dict(msg)
        self.answer_status = answer_status(h)
        if msg.end_of_stream:
            return out
        out.response_headers.response.header_mutation.CopyFrom(mutation(
            [(RESP_TRANSLATED, self.endpoint.translated_tag)], ["content-length"]))
        if "text/event-stream" in h.get("content-type", "") and self.answer_status < 400:
            self.answer_stream = translator.stream(self.answer_echo)
            out.mode_override.CopyFrom(route_mode("STREAMED"))
        else:
            out.mode_override.CopyFrom(route_mode("BUFFERED"))
        return out

    def _on_answer_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        translator = self.endpoint.translator
        if self.answer_stream is not None:
            return response_chunk(self.answer_stream.feed(msg.body, msg.end_of_stream))
        if self.answer_echo is None or translator is None:
            return response_chunk(None)
        return response_chunk(translated_whole(translator, self.answer_status, msg.body,
                                               self.answer_echo))

    def fail(self) -> pb.ProcessingResponse:
        self.record.rejected(500, "internal_error")
        return self._answer(internal_error(self.record.request_id))
