"""The ext_proc protobuf messages, built in one place (the names they carry: ``contract.py``).

Both stages describe their answers as plain data (plans, replies); this turns them into
``ProcessingResponse`` messages, and Envoy's requests into plain dicts.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, struct_pb2

from ..contract import META_NS, header_safe
from ..core.errors import Reply

_MODE = processing_mode_pb2.ProcessingMode


def _modes(request_body: int, response_body: int) -> processing_mode_pb2.ProcessingMode:
    """Headers both ways, no trailers, the bodies as given."""
    return _MODE(
        request_header_mode=_MODE.SEND, response_header_mode=_MODE.SEND,
        request_body_mode=request_body, response_body_mode=response_body,
        request_trailer_mode=_MODE.SKIP, response_trailer_mode=_MODE.SKIP,
    )


def attempt_mode(request_body: bool, response_body: bool) -> processing_mode_pb2.ProcessingMode:
    """The attempt stage's mode for one attempt: bodies only when this attempt needs them."""
    return _modes(_MODE.BUFFERED if request_body else _MODE.NONE,
                  _MODE.STREAMED if response_body else _MODE.NONE)


def whole_answer_mode() -> processing_mode_pb2.ProcessingMode:
    """The rest of an attempt once its answer's headers are answered: Envoy buffers the whole
    body and sends it in one message, the headers held back until that is answered (no
    message per chunk, no timeout extension while the body comes)."""
    return _modes(_MODE.NONE, _MODE.BUFFERED)


def route_mode(answer_body: str | None = None) -> processing_mode_pb2.ProcessingMode:
    """The route stage's mode with the answer's headers sent too, and its body as
    ``answer_body`` says ("BUFFERED", "STREAMED"; None: not sent)."""
    return _modes(_MODE.BUFFERED,
                  _MODE.BodySendMode.Value(answer_body) if answer_body else _MODE.NONE)


def headers_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def answer_status(headers: dict[str, str]) -> int:
    """An answer's status from its headers (0 when it is missing or not a number)."""
    status = headers.get(":status", "0")
    return int(status) if status.isdigit() else 0


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Most header settings repeat request after request (cluster, retries, credentials): build
# each once. Bounded; values that vary (content-length) are not kept.
_HVO_CACHE: dict[tuple[str, str], base_pb2.HeaderValueOption] = {}


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


def response_chunk(body: bytes | None) -> pb.ProcessingResponse:
    """The answer to one response body chunk: passed as it is (None), or replaced."""
    out = pb.ProcessingResponse()
    if body is None:
        out.response_body.SetInParent()
    elif body:
        out.response_body.response.body_mutation.body = body
    else:
        out.response_body.response.body_mutation.clear_body = True
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
