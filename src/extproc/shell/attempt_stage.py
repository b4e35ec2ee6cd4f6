"""The attempt stage's stream: one attempt at one backend (every retry is a new stream), as an
upstream filter in the backend clusters.

Decodes Envoy's messages and the route stage's hand-off, asks the planner what this attempt's
request needs and whether its answer is held, feeds a held answer to the core's judge, runs the
effects (body work, schema checks) and encodes the answers. ``Processor`` (``server.py``)
drives it and guarantees it never raises out.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .. import metrics
from ..contract import (
    ATTR_ADDRESS,
    ATTR_ATTEMPT,
    ATTR_REQUEST_ID,
    RESP_BACKEND,
    RESP_MODEL,
    RESP_TRANSLATED,
    HandOff,
)
from ..core.backends import set_model
from ..core.capabilities import AnswerHold, Needs
from ..core.endpoints import (
    BY_PATH,
    Endpoint,
    StreamTranslator,
    in_envelope,
    translated_whole,
)
from ..core.errors import Refusal, error_reply, internal_error
from ..core.plan import AttemptPlan, BodyWork, verdict_headers
from ..effects.adapt import BodyAdapter
from ..logs import log_event
from ..runtime import Runtime
from .adapting import adapt
from .protocol import (
    answer_status,
    attempt_mode,
    attribute_values,
    body_answer,
    extend_timeout,
    headers_dict,
    immediate,
    mutation,
    response_chunk,
    whole_answer_mode,
)

Out = AsyncIterator[pb.ProcessingResponse]


class AttemptStream:
    """One attempt: which candidate it reached, its request adapted, its answer judged (and,
    for a backend spoken to in another API, translated back)."""

    def __init__(self, rt: Runtime, log: Any):
        self.rt, self.log = rt, log
        self.request_id = "-"
        self.backend: str | None = None
        self.model: str | None = None
        self.body_model: str | None = None
        self.work: BodyWork | None = None
        self.needs: Needs | None = None
        self.endpoint: Endpoint = BY_PATH["/v1/chat/completions"]
        self.content_type = ""
        self.attempt = 1
        self.last = True          # the final candidate: a failed check cannot be retried
        self.tags: list[tuple[str, str]] = []
        self.hold: AnswerHold | None = None
        # Spoken to in another API: what of the request its answer repeats, the live stream
        # translation, the translated bytes of each held chunk.
        self.translated = False
        self.echo: dict[str, Any] = {}
        self.stream_tx: StreamTranslator | None = None
        self.held_out: list[bytes] = []
        self.buffered = False  # a translated whole answer, the last candidate's: one message
        self.status = 0

    async def handle(self, req: pb.ProcessingRequest) -> Out:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                yield self._on_headers(req)
            elif kind == "request_body":
                async for out in self._on_body(req.request_body):
                    yield out
            elif kind == "response_headers":
                if self.backend is None:  # the judged cluster: no request side, attributes now
                    self._reached(attribute_values(req), "", False)
                async for out in self._on_response_headers(req.response_headers):
                    yield out
            elif kind == "response_body":
                async for out in self._on_response_body(req.response_body):
                    yield out
        except Refusal as refused:
            yield immediate(in_envelope(self.endpoint, refused.reply))

    def _reached(self, attrs: dict[str, object], current_path: str, has_body: bool
                 ) -> AttemptPlan:
        """Which candidate this attempt reached, and what the planner says of it. Raises
        Refusal (a 502) when it cannot be told."""
        request_id = attrs.get(ATTR_REQUEST_ID)
        if isinstance(request_id, str) and request_id:
            self.request_id = request_id
        handoff = HandOff.decode(attrs)
        if handoff is None:
            raise Refusal(error_reply(
                502, "request reached a backend without a routing decision (is the route-stage "
                "ext_proc filter installed?)", code="no_routing_decision", type="server_error"))
        self.endpoint = handoff.endpoint
        self.attempt = int(float(attrs.get(ATTR_ATTEMPT) or 1))
        plan = self.rt.planner.attempt(handoff, self.attempt, str(attrs.get(ATTR_ADDRESS) or ""),
                                       current_path, has_body)
        self.backend, self.model = plan.target.backend, plan.target.model
        self.last, self.needs = plan.last, handoff.needs
        self.body_model, self.work = plan.body_model, plan.work
        self.translated = plan.translated
        if handoff.echo is not None:  # translated by the route stage (the body is not seen)
            self.echo = handoff.echo
        return plan

    def _on_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        h = headers_dict(req.request_headers)
        self.request_id = h.get("x-request-id", "-")
        self.content_type = h.get("content-type", "")
        plan = self._reached(attribute_values(req), h.get(":path", ""),
                             not req.request_headers.end_of_stream)
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=pb.CommonResponse(
                header_mutation=mutation(plan.set_headers, plan.remove_headers))),
            mode_override=attempt_mode(plan.needs_body, plan.needs_response))

    async def _on_body(self, msg: pb.HttpBody) -> Out:
        assert self.model is not None
        if self.work is None:
            new = set_model(msg.body, self.body_model, self.model, self.content_type)
            yield body_answer([("content-length", str(len(new)))], [], new) if new is not None \
                else pb.ProcessingResponse(request_body=pb.BodyResponse())
            return
        data = orjson.loads(msg.body)
        translator = self.endpoint.translator
        if self.translated and translator is not None:
            self.echo = translator.echo(data)
        adapter = BodyAdapter(self.rt, self.work, self.request_id)
        async for extension in adapt(adapter, adapter.plan(data)):
            yield extension
        self.tags += adapter.tags
        yield body_answer([("content-length", str(len(adapter.body)))], [], adapter.body)

    # ------------------------------------------------------------ answers

    def _headers_answer(self, extra: list[tuple[str, str]] | None = None
                        ) -> pb.ProcessingResponse:
        tags = [(RESP_BACKEND, self.backend or ""), (RESP_MODEL, self.model or ""), *self.tags,
                *(extra or [])]
        remove = []
        if self.translated:  # the body changes: its length is not the backend's
            remove.append("content-length")
            tags.append((RESP_TRANSLATED, self.endpoint.translated_tag))
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(tags, remove))))

    async def _on_response_headers(self, msg: pb.HttpHeaders) -> Out:
        h = headers_dict(msg)
        self.status = status = answer_status(h)
        plan = self.rt.planner.response(status, h, msg.end_of_stream, self.needs, self.last,
                                        time.time(), self.translated)
        if plan.rate_limited:
            self._rate_limited(plan.retry_after_s)
        if plan.unreadable:
            log_event(self.log, {"event": "capability.unjudged", "request_id": self.request_id,
                                 "backend": self.backend,
                                 "why": f"content-encoding {plan.unreadable[:40]!r}"})
        translator = self.endpoint.translator if plan.translate else None
        if translator is not None and plan.stream and status < 400:
            self.stream_tx = translator.stream(self.echo)
        if not plan.hold:
            out = self._headers_answer()
            if self.stream_tx is None:
                out.mode_override.CopyFrom(attempt_mode(False, False))  # no body messages
            yield out
            return
        if plan.translate and not plan.stream and plan.needs is None and self.last:
            # translated, not judged, no candidate after it: Envoy buffers it whole, then we
            # translate it. (Not while another candidate remains: a backend reset mid-body
            # was then, rarely, not retried: 1 in ~1,100 under load, measured; our own hold
            # never lost one.)
            self.buffered = True
            out = self._headers_answer()
            out.mode_override.CopyFrom(whole_answer_mode())
            yield out
            return
        cfg = self.rt.config.capability_routing
        whole = self.rt.config.envoy.max_body_bytes if plan.translate and not plan.stream \
            else None
        self.hold = AnswerHold(plan.needs, status, plan.stream, plan.inflate,
                               cfg.hold_max_bytes, cfg.hold_max_s, time.monotonic(),
                               "chat" if self.translated else self.endpoint.dialect or "chat",
                               whole)
        yield extend_timeout(cfg.hold_max_s)

    async def _on_response_body(self, msg: pb.HttpBody) -> Out:
        if self.buffered:
            yield response_chunk(self._whole(msg.body))
            return
        hold = self.hold
        if hold is None:
            yield response_chunk(self._translated(msg.body, msg.end_of_stream))
            return
        if self.stream_tx is not None:
            self.held_out.append(self.stream_tx.feed(msg.body, msg.end_of_stream))
        verdict = hold.feed(msg.body, msg.end_of_stream, time.monotonic())
        if verdict is None:
            return
        if verdict.schema_values and hold.needs is not None and hold.needs.schema is not None:
            verdict = await self.rt.schema_judge.judge(hold.needs.schema, verdict.schema_values)
        self.hold = None
        if verdict.ok is False:
            self._note(verdict.reason)
        yield self._headers_answer(verdict_headers(verdict, self.last))
        if self.held_out:  # a translated stream: each held chunk as translated
            for out in self.held_out:
                yield response_chunk(out)
            self.held_out = []
        elif self.translated and msg.end_of_stream:  # a whole answer, translated whole
            for _ in range(hold.held - 1):
                yield response_chunk(b"")
            yield response_chunk(self._whole(bytes(hold.body)))
        else:
            for _ in range(hold.held):
                yield pb.ProcessingResponse(response_body=pb.BodyResponse())

    def _translated(self, chunk: bytes, end: bool) -> bytes | None:
        """A chunk of a live translated stream (None: passed as it is)."""
        return None if self.stream_tx is None else self.stream_tx.feed(chunk, end)

    def _whole(self, body: bytes) -> bytes:
        translator = self.endpoint.translator
        assert translator is not None
        return translated_whole(translator, self.status, body, self.echo)

    def _rate_limited(self, seconds: float | None) -> None:
        """A 429: Envoy tries the next candidate now (a retriable status); this backend cools
        down for its Retry-After, so that later requests skip it meanwhile."""
        if seconds and self.backend:
            self.rt.health.retry_after(self.backend, seconds, time.monotonic(), time.time())
        if not self.last:  # else the 429 is the client's answer, not a retry
            self._note("rate_limited: 429" + (f", Retry-After {seconds:.0f}s" if seconds else ""))

    def _note(self, reason: str) -> None:
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

    def fail(self) -> pb.ProcessingResponse:
        return immediate(in_envelope(self.endpoint, internal_error(self.request_id)))
