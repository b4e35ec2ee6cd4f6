"""Envoy ext_proc protocol names and message helpers shared by both stages and the renderer."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from .errors import Reply

STAGE_KEY = "x-extproc-stage"
CLUSTER_HEADER = "x-extproc-cluster"
META_NS = "extproc"
ATTR_ADDRESS = "upstream.address"
ATTR_ATTEMPT = "upstream.request_attempt_count"
ATTR_CANDIDATES = "metadata.filter_metadata['extproc']['candidates']"
ATTR_BODY_MODEL = "metadata.filter_metadata['extproc']['body_model']"
ATTR_PARTS = "metadata.filter_metadata['extproc']['parts']"
ATTR_NEEDS = "metadata.filter_metadata['extproc']['needs']"
ATTR_UNSTORED_META = "metadata.filter_metadata['extproc']['unstored_metadata']"
ATTEMPT_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, ATTR_CANDIDATES, ATTR_BODY_MODEL, ATTR_PARTS,
                      ATTR_NEEDS, ATTR_UNSTORED_META)
RETRY_HEADER = "x-extproc-retry"
RESP_UNMET = "x-extproc-unmet-capability"
RESP_BACKEND = "x-extproc-backend"
RESP_MODEL = "x-extproc-model"
RESP_ATTEMPTS = "x-extproc-attempts"
RESP_CONVERTED = "x-extproc-converted-parts"
RESP_WARNINGS = "x-extproc-warnings"
RESP_VISION = "x-extproc-vision"
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


def struct(fields: dict[str, dict[str, str]]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s
