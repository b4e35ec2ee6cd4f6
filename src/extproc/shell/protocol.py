"""Envoy ext_proc protocol names and message helpers shared by both stages and the renderer."""

from __future__ import annotations

import re

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, struct_pb2

from ..core.errors import Reply

STAGE_KEY = "x-extproc-stage"
CLUSTER_HEADER = "x-extproc-cluster"
# Set by the route stage on streaming requests, to how long (ms) an attempt may stay silent:
# Envoy's route for that value fails over after it (the header never leaves Envoy).
STREAM_HEADER = "x-extproc-stream"
PER_TRY_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"
HEALTH_PATH = "/extproc/health"  # GET: each backend's health, answered by the route stage
META_NS = "extproc"
ATTR_ADDRESS = "upstream.address"
ATTR_ATTEMPT = "upstream.request_attempt_count"
ATTR_CANDIDATES = "metadata.filter_metadata['extproc']['candidates']"
ATTR_BODY_MODEL = "metadata.filter_metadata['extproc']['body_model']"
ATTR_PARTS = "metadata.filter_metadata['extproc']['parts']"
ATTR_NEEDS = "metadata.filter_metadata['extproc']['needs']"
ATTR_UNSTORED_META = "metadata.filter_metadata['extproc']['unstored_metadata']"
# The client's own path and credentials: the route stage removes the credentials from the
# request (each attempt sets its backend's), so the attempt stage has them from here.
ATTR_PATH = "metadata.filter_metadata['extproc']['path']"
ATTR_CLIENT_AUTH = "metadata.filter_metadata['extproc']['client_auth']"
ATTR_REQUEST_ID = "request.headers['x-request-id']"
ATTEMPT_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, ATTR_CANDIDATES, ATTR_BODY_MODEL, ATTR_PARTS,
                      ATTR_NEEDS, ATTR_UNSTORED_META, ATTR_PATH, ATTR_CLIENT_AUTH)
# The judged cluster's attempt stage sees only responses: what it needs comes with them.
JUDGED_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, ATTR_CANDIDATES, ATTR_NEEDS, ATTR_REQUEST_ID)
RETRY_HEADER = "x-extproc-retry"
RESP_UNMET = "x-extproc-unmet-capability"
RESP_BACKEND = "x-extproc-backend"
RESP_MODEL = "x-extproc-model"
RESP_ATTEMPTS = "x-extproc-attempts"
RESP_CONVERTED = "x-extproc-converted-parts"
RESP_WARNINGS = "x-extproc-warnings"
RESP_VISION = "x-extproc-vision"
# A body adapted by the route stage: the metadata key that carries each of its response
# headers (Envoy's route sets the header from it; the attempt stage sets its own).
TAG_META = {RESP_CONVERTED: "converted", RESP_VISION: "vision"}
# What the decision log needs from each response (see accesslog.py).
DECISION_HEADERS = (RESP_BACKEND, RESP_MODEL, RESP_CONVERTED, RESP_VISION, RESP_UNMET)
DECISION_LOG_NAME = "llm_extproc_decisions"

_MODE = processing_mode_pb2.ProcessingMode


def attempt_mode(request_body: bool, response_body: bool) -> processing_mode_pb2.ProcessingMode:
    """The attempt stage's mode for one attempt: bodies only when this attempt needs them."""
    return _MODE(
        request_header_mode=_MODE.SEND, response_header_mode=_MODE.SEND,
        request_body_mode=_MODE.BUFFERED if request_body else _MODE.NONE,
        response_body_mode=_MODE.STREAMED if response_body else _MODE.NONE,
        request_trailer_mode=_MODE.SKIP, response_trailer_mode=_MODE.SKIP,
    )


def headers_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Most header settings repeat request after request (cluster, retries, credentials): build
# each once. Bounded; values that vary (content-length) are not kept.
_HVO_CACHE: dict[tuple[str, str], base_pb2.HeaderValueOption] = {}


_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_safe(value: str) -> str:
    """A header value that cannot end the header: control characters become %XX. Every value
    we set goes through here, whatever its source (validation upstream is the first line; a
    value that slipped through must still not inject a header or make Envoy refuse the
    mutation)."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value)


def _hvo(key: str, value: str) -> base_pb2.HeaderValueOption:
    out = _HVO_CACHE.get((key, value))
    if out is None:
        out = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, raw_value=header_safe(value).encode()),
            append_action=_OVERWRITE)
        if key != "content-length" and len(_HVO_CACHE) < 4096:
            _HVO_CACHE[(key, value)] = out
    return out


def mutation(set_: list[tuple[str, str]] | None = None,
             remove: list[str] | None = None) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[_hvo(k, v) for k, v in set_ or ()], remove_headers=remove or []
    )


def body_answer(set_: list[tuple[str, str]], remove: list[str], body: bytes | None,
                metadata: dict[str, str] | None = None, clear_route_cache: bool = False
                ) -> pb.ProcessingResponse:
    """The answer to a request body, built in place (constructors copy nested messages: twice
    the cost on the hot path)."""
    out = pb.ProcessingResponse()
    common = out.request_body.response
    if set_ or remove:
        hm = common.header_mutation
        hm.set_headers.extend([_hvo(k, v) for k, v in set_])
        hm.remove_headers.extend(remove)
    if body is not None:
        common.body_mutation.body = body
    if clear_route_cache:
        common.clear_route_cache = True
    if metadata:
        target = out.dynamic_metadata.fields[META_NS].struct_value.fields
        for k, v in metadata.items():
            target[k].string_value = v
    return out


def immediate(reply: Reply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=mutation(list(reply.headers.items())),
            body=reply.body,
            details="llm_extproc",
        )
    )


def extend_timeout(seconds: float) -> pb.ProcessingResponse:
    """Ask Envoy to wait longer for our next answer (up to its ``max_message_timeout``)."""
    return pb.ProcessingResponse(override_message_timeout=duration_pb2.Duration(
        seconds=int(seconds), nanos=int((seconds % 1) * 1e9)))


def attribute_values(req: pb.ProcessingRequest) -> dict[str, object]:
    out: dict[str, object] = {}
    for struct in req.attributes.values():
        for key, val in struct.fields.items():
            kind = val.WhichOneof("kind")
            out[key] = getattr(val, kind) if kind else None
    return out


def struct(fields: dict[str, dict[str, str]]) -> struct_pb2.Struct:
    """Dynamic metadata: namespaces of string values (3x faster than ``Struct.update``)."""
    s = struct_pb2.Struct()
    for ns, values in fields.items():
        target = s.fields[ns].struct_value.fields
        for k, v in values.items():
            target[k].string_value = v
    return s
