"""Work shared between requests: limited slots handed out fairly, and one call per key.

Aux vision calls, fetches and transcodes are bounded per service process. A plain semaphore
serves waiters first come, first served, so one request with 16 images queues all of them
before another request's single image: that one waits for the whole batch, and times out.
``FairLimiter`` hands each free slot to the next *request* in turn instead.

``SharedCalls`` runs concurrent calls with the same key once. The call belongs to no caller:
one caller leaving (its client disconnected, its stream cancelled) stops only its own wait;
the call goes on for the others, and is cancelled only when nobody waits for it any more.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class FairLimiter:
    """At most ``capacity`` holders at once; when all slots are taken, waiting owners (one per
    request) are served in turn, and each owner's waiters first come, first served."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.active = 0
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, owner: str) -> None:
        if self.active < self.capacity and not self.waiting:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(owner, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # granted as we left: pass the slot on
            else:
                queue = self.waiting.get(owner)
                if queue is not None and fut in queue:
                    queue.remove(fut)
                    if not queue:
                        del self.waiting[owner]
            raise

    def _release(self) -> None:
        self.active -= 1
        while self.waiting and self.active < self.capacity:
            owner, queue = next(iter(self.waiting.items()))
            fut = queue.popleft()
            if queue:
                self.waiting.move_to_end(owner)  # the next owner's turn
            else:
                del self.waiting[owner]
            if not fut.done():
                fut.set_result(None)
                self.active += 1


@dataclass(slots=True)
class _Call(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class SharedCalls(Generic[T]):
    """One call per key at a time; every concurrent caller with that key gets its result."""

    def __init__(self) -> None:
        self.calls: dict[str, _Call[T]] = {}

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """-> (result, whether another caller had started it)."""
        call = self.calls.get(key)
        shared = call is not None
        if call is None:
            call = _Call(asyncio.ensure_future(start()))
            self.calls[key] = call
            call.task.add_done_callback(lambda t, key=key: self._done(key, t))
        call.waiters += 1
        try:
            return await asyncio.shield(call.task), shared
        finally:
            call.waiters -= 1
            if call.waiters == 0 and not call.task.done():
                call.task.cancel()  # nobody wants it any more

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        if self.calls.get(key) is not None and self.calls[key].task is task:
            del self.calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: each waiter re-raises it itself
