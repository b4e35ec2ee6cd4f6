"""Body work in either stage: the one sequence both run, with Envoy's timeout extension."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..core.parts import Part
from ..effects.adapt import BodyAdapter
from .protocol import extend_timeout


async def adapt(adapter: BodyAdapter, data: dict[str, Any], parts: list[Part] | None = None
                ) -> AsyncIterator[pb.ProcessingResponse]:
    """Do the adapter's work; first, when it will wait on the network (aux calls, fetches),
    yield the message that extends Envoy's timeout for our next answer. The body is then
    ``adapter.body``. Raises Refusal."""
    wait = adapter.plan(data, parts)
    if wait:
        yield extend_timeout(wait)
    adapter.body = await adapter.run()
