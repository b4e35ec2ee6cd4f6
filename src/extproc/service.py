"""The thin gRPC shell: maps Envoy ext_proc messages to the core and back.

One ExternalProcessor serves both stages; Envoy says which in the ``x-extproc-stage`` initial
metadata. A stream handler never lets an exception escape (Envoy would turn it into a bare 500):
it logs the traceback and answers with a JSON 500 naming the request id.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .attempt import BackendRuntime, backend_runtimes, header_plan, pick_candidate, rewrite_model
from .config import Config
from .decision import DecisionRecord
from .errors import Reply, error_reply, internal_error
from .fetch import Fetcher, FetchError, FetchPolicy
from .logs import log_event
from .parts import ConvertError, Sig, convert_body, fetch_targets, inspect_parts, needs_change
from .routing import (
    RouteDecision,
    RoutingTable,
    check_request_line,
    decode_candidates,
    parse_json_body,
    route_request,
)

log = logging.getLogger("extproc")

STAGE_KEY = "x-extproc-stage"
CLUSTER_HEADER = "x-extproc-cluster"
META_NS = "extproc"
ATTR_ADDRESS = "upstream.address"
ATTR_ATTEMPT = "upstream.request_attempt_count"
ATTR_CANDIDATES = "metadata.filter_metadata['extproc']['candidates']"
ATTR_BODY_MODEL = "metadata.filter_metadata['extproc']['body_model']"
ATTR_PARTS = "metadata.filter_metadata['extproc']['parts']"
ATTEMPT_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, ATTR_CANDIDATES, ATTR_BODY_MODEL, ATTR_PARTS)
RESP_BACKEND = "x-extproc-backend"
RESP_MODEL = "x-extproc-model"
RESP_ATTEMPTS = "x-extproc-attempts"
RESP_CONVERTED = "x-extproc-converted-parts"
RESP_WARNINGS = "x-extproc-warnings"

_SKIP_BODY = processing_mode_pb2.ProcessingMode(
    request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
    response_header_mode=processing_mode_pb2.ProcessingMode.SEND,
    request_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything compiled from one config; swapped whole on reload."""

    config: Config
    table: RoutingTable
    backends: dict[str, BackendRuntime]
    fetcher: Fetcher

    @classmethod
    def build(cls, cfg: Config, env: dict[str, str] | None = None) -> Runtime:
        f = cfg.fetch
        policy = FetchPolicy(f.timeout_s, f.max_bytes, f.allow_private, frozenset(f.allow_hosts),
                             f.allow_http, f.max_redirects, f.ca_bundle)
        return cls(cfg, RoutingTable(cfg), backend_runtimes(cfg, env), Fetcher(policy))


# ---------------------------------------------------------------- message helpers

def headers_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _hvo(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def mutation(set_: list[tuple[str, str]] | None = None,
             remove: list[str] | None = None) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[_hvo(k, v) for k, v in set_ or ()], remove_headers=remove or []
    )


def immediate(reply: Reply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=mutation(list(reply.headers.items())),
            body=reply.body,
            details="llm_extproc",
        )
    )


def attribute_values(req: pb.ProcessingRequest) -> dict[str, object]:
    out: dict[str, object] = {}
    for struct in req.attributes.values():
        for key, val in struct.fields.items():
            kind = val.WhichOneof("kind")
            out[key] = getattr(val, kind) if kind else None
    return out


def _struct(fields: dict[str, dict[str, str]]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


# ---------------------------------------------------------------- stage handlers

class RouteStream:
    """HCM-stage stream: one client request. Validates, routes, records the decision."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.path = ""
        self.record = DecisionRecord(request_id="-")

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._on_headers(req.request_headers)
        if kind == "request_body":
            return self._on_body(req.request_body)
        if kind == "response_headers":
            return self._on_response(req.response_headers)
        return None

    def _reject(self, reply: Reply) -> pb.ProcessingResponse:
        self.record.rejected(reply.status, reply.code)
        return immediate(reply)

    def _on_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = headers_dict(msg)
        self.record.request_id = h.get("x-request-id", "-")
        method = h.get(":method", "")
        self.path = h.get(":path", "").split("?", 1)[0]
        self.record.method, self.record.path = method, self.path
        early = check_request_line(self.rt.table, method, self.path)
        if early is not None:
            if method == "GET" and early.status == 200:
                self.record.outcome, self.record.status = "answered", 200
                return immediate(early)
            return self._reject(early)
        if msg.end_of_stream:
            return self._reject(error_reply(
                400, "The request has no body; expected a JSON object", code="invalid_json"))
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())

    def _on_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        data = parse_json_body(msg.body)
        if isinstance(data, Reply):
            return self._reject(data)
        model = data.get("model")
        self.record.model_requested = model if isinstance(model, str) else None
        decision = route_request(self.rt.table, data)
        if isinstance(decision, Reply):
            return self._reject(decision)
        self.record.routed(decision)
        return self._routed(decision)

    def _routed(self, d: RouteDecision) -> pb.ProcessingResponse:
        body_model = d.requested if d.resolution != "default" else None
        meta = {
            "hosts": d.hosts,
            "candidates": d.candidates_meta,
            "body_model": orjson.dumps(body_model).decode(),
            "public_model": d.public_model,
        }
        if d.sigs:
            meta["parts"] = orjson.dumps([s.encode() for s in d.sigs]).decode()
        common = pb.CommonResponse(
            header_mutation=mutation([
                (CLUSTER_HEADER, d.cluster),
                ("x-envoy-max-retries", str(len(d.candidates) - 1)),
            ]),
            clear_route_cache=True,
        )
        return pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=common),
            dynamic_metadata=_struct({META_NS: meta}),
        )

    def _on_response(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = headers_dict(msg)
        try:
            status = int(h.get(":status", "0"))
        except ValueError:
            status = 0
        attempts = h.get("x-envoy-attempt-count")
        n = int(attempts) if attempts and attempts.isdigit() else None
        if self.record.outcome == "incomplete":
            self.record.answered(status, h.get(RESP_BACKEND), h.get(RESP_MODEL), n)
            converted = h.get(RESP_CONVERTED)
            if converted and converted.isdigit():
                self.record.converted_parts = int(converted)
        add = [(RESP_ATTEMPTS, str(n))] if n else []
        if self.record.warnings:
            add.append((RESP_WARNINGS, "; ".join(self.record.warnings)[:2000]))
        return pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=mutation(
                    add, ["x-envoy-attempt-count"]))
            )
        )

    def fail(self) -> pb.ProcessingResponse:
        self.record.rejected(500, "internal_error")
        return immediate(internal_error(self.record.request_id))

    def close(self) -> None:
        if self.record.method:
            log_event(log, self.record.as_log())


class AttemptStream:
    """Upstream-stage stream: one attempt at one backend (every retry is a new stream)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.request_id = "-"
        self.backend: str | None = None
        self.model: str | None = None
        self.new_model: str | None = None
        self.body_model: str | None = None
        self.convert = False
        self.converted = 0

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._on_headers(req)
        if kind == "request_body":
            return await self._on_body(req.request_body)
        if kind == "response_headers":
            tags = [(RESP_BACKEND, self.backend or ""), (RESP_MODEL, self.model or "")]
            if self.converted:
                tags.append((RESP_CONVERTED, str(self.converted)))
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=mutation(tags))))
        return None

    def _on_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        h = headers_dict(req.request_headers)
        self.request_id = h.get("x-request-id", "-")
        attrs = attribute_values(req)
        address = str(attrs.get(ATTR_ADDRESS) or "")
        attempt = int(float(attrs.get(ATTR_ATTEMPT) or 1))
        meta = attrs.get(ATTR_CANDIDATES)
        if not isinstance(meta, str) or not meta:
            return immediate(error_reply(
                502, "request reached a backend without a routing decision (is the route-stage "
                "ext_proc filter installed?)", code="no_routing_decision", type="server_error"))
        picked = pick_candidate(decode_candidates(meta), attempt, address)
        if picked is None:
            return immediate(error_reply(
                502, f"attempt {attempt} reached {address}, which is not a candidate for this "
                "request", code="unexpected_upstream", type="server_error"))
        _, target = picked
        self.backend, self.model = target.backend, target.model
        raw_model = attrs.get(ATTR_BODY_MODEL)
        self.body_model = orjson.loads(raw_model) if isinstance(raw_model, str) else None
        plan = header_plan(self.rt.backends[target.backend], h.get(":path", ""))
        raw_parts = attrs.get(ATTR_PARTS)
        if isinstance(raw_parts, str) and raw_parts:
            sigs = [Sig.decode(x) for x in orjson.loads(raw_parts)]
            self.convert = needs_change(self.rt.table.profiles[target.backend], sigs)
        needs_body = (target.model != self.body_model or self.convert) \
            and not req.request_headers.end_of_stream
        self.new_model = target.model
        resp = pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(plan.set, plan.remove))))
        if not needs_body:
            resp.mode_override.CopyFrom(_SKIP_BODY)
        return resp

    async def _on_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        assert self.new_model is not None and self.backend is not None
        if self.convert:
            try:
                new: bytes | None = await self._convert(msg.body)
            except (ConvertError, FetchError) as exc:
                return immediate(exc.reply)
        else:
            new = rewrite_model(msg.body, self.body_model, self.new_model)
        if new is None:
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=mutation([("content-length", str(len(new)))]),
            body_mutation=pb.BodyMutation(body=new),
        )))

    async def _convert(self, body: bytes) -> bytes:
        """Parse once, fetch what this backend cannot fetch itself, convert, serialise once."""
        assert self.backend is not None
        data = orjson.loads(body)
        report = inspect_parts(data)
        profile = self.rt.table.profiles[self.backend]
        targets = fetch_targets(profile, report)
        fetched: dict[str, tuple[str, bytes]] = {}
        if targets:
            urls = list(dict.fromkeys(p.url for p in targets if p.url))
            params = {p.url: p.path for p in targets}
            results = await asyncio.gather(
                *(self.rt.fetcher.fetch(u, params[u]) for u in urls))
            fetched = dict(zip(urls, results, strict=True))
        self.converted = convert_body(data, report, profile, fetched)
        data["model"] = self.new_model
        return orjson.dumps(data)

    def fail(self) -> pb.ProcessingResponse:
        return immediate(internal_error(self.request_id))

    def close(self) -> None:
        pass


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stage = "route"
        for md in context.invocation_metadata() or ():
            if md.key == STAGE_KEY:
                stage = str(md.value)
        handler: RouteStream | AttemptStream = (
            AttemptStream(self.rt) if stage == "attempt" else RouteStream(self.rt)
        )
        try:
            async for req in request_iterator:
                try:
                    out = await handler.handle(req)
                except Exception:
                    log.exception("servicer error", extra={"fields": {
                        "event": "servicer.error", "stage": stage,
                        "request_id": getattr(handler, "request_id", None)
                        or handler.record.request_id}})  # type: ignore[union-attr]
                    out = handler.fail()
                if out is not None:
                    yield out
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream error", extra={"fields": {"event": "stream.error"}})
        finally:
            try:
                handler.close()
            except Exception:
                log.exception("close error", extra={"fields": {"event": "close.error"}})


async def serve(rt: Runtime, host: str | None = None, port: int | None = None) -> None:
    """Run until SIGTERM/SIGINT; in-flight streams get the configured grace period."""
    cfg = rt.config.service
    max_bytes = cfg.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(rt), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = f"{host or cfg.host}:{port or cfg.port}"
    bound = server.add_insecure_port(addr)
    if bound == 0:
        raise OSError(f"cannot bind {addr}")
    await server.start()
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event(log, {"event": "service.started", "address": addr,
                    "models": rt.table.public_names()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, {"event": "service.stopping", "grace_s": cfg.shutdown_grace_s})
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(cfg.shutdown_grace_s)
    log_event(log, {"event": "service.stopped"})
