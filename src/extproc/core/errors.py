"""OpenAI-style error replies, produced by the core and sent by Envoy as immediate responses."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson


@dataclass(frozen=True, slots=True)
class Reply:
    """A response the gateway answers itself instead of forwarding the request."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None


def error_reply(
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    type: str = "invalid_request_error",
    extra: dict[str, object] | None = None,
) -> Reply:
    """The OpenAI error envelope: ``{"error": {message, type, param, code}}``."""
    err: dict[str, object] = {"message": message, "type": type, "param": param, "code": code}
    if extra:
        err.update(extra)
    return Reply(status, orjson.dumps({"error": err}), {"content-type": "application/json"}, code)


def json_reply(status: int, payload: object) -> Reply:
    return Reply(status, orjson.dumps(payload), {"content-type": "application/json"})


def internal_error(request_id: str) -> Reply:
    return error_reply(
        500,
        f"internal error in llm-extproc while processing request {request_id}; "
        "the service log has the details under this request id",
        code="internal_error",
        type="server_error",
        extra={"request_id": request_id},
    )
