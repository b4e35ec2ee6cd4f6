"""Body work in either stage: the one sequence both run, with Envoy's timeout extension."""

from __future__ import annotations

from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..effects.adapt import BodyAdapter
from .protocol import extend_timeout


async def adapt(adapter: BodyAdapter, wait: float) -> AsyncIterator[pb.ProcessingResponse]:
    """Do the planned adapter's work; first, when it will wait on the network (``wait``
    seconds at most: aux calls, fetches), yield the message that extends Envoy's timeout for
    our next answer. The body is then ``adapter.body``. Raises Refusal."""
    if wait:
        yield extend_timeout(wait)
    adapter.body = await adapter.run()
