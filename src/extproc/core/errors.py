"""OpenAI-style error replies, and the one way the service says no: ``Refusal``.

Anything in the core or the effects that refuses a request raises ``Refusal`` carrying the
``Reply`` for the client; each stage catches it once and answers with it."""

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


class Refusal(Exception):
    """A request refused, with the client's answer. Raised anywhere, caught once per stage."""

    def __init__(self, reply: Reply):
        super().__init__(reply.code or str(reply.status))
        self.reply = reply


def refusal(status: int, message: str, *, code: str | None, param: str | None = None,
            type: str = "invalid_request_error", extra: dict[str, object] | None = None
            ) -> Refusal:
    """``raise refusal(...)``: a Refusal with the OpenAI error envelope."""
    return Refusal(error_reply(status, message, code=code, param=param, type=type, extra=extra))
