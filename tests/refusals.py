"""Driving the core from tests: a raw body routed in one call, and the error a core call
refuses with (the tests' side of the one error path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from extproc.core.errors import Refusal
from extproc.core.routing import (
    RouteDecision,
    RoutingTable,
    model_key,
    parse_json_body,
    route_request,
)


def refused(call: Callable[..., Any], *args: Any, **kw: Any) -> dict[str, Any]:
    """``call(*args, **kw)`` must raise Refusal: its error envelope, with the status."""
    with pytest.raises(Refusal) as exc:
        call(*args, **kw)
    return {**orjson.loads(exc.value.reply.body)["error"], "status": exc.value.reply.status}


def route_body(table: RoutingTable, body: bytes) -> RouteDecision:
    """What the route stage does with a raw body, in one call; raises Refusal."""
    data = parse_json_body(body)
    model_key(body, data)
    return route_request(table, data)
