"""The service's gRPC server: ``grpc_wire`` connections on asyncio, each stream served by the
method its ``:path`` names.

A method opens a ``Call`` per stream and is given each message as bytes. An answer computed at
once is sent at once, inside the read that brought the message (the route stage's usual case:
no task, no queue); an answer that must wait (an async iterator) runs as a task, and the
stream's later messages queue behind it, in order, their window withheld meanwhile. A call
that raises ends its stream with INTERNAL and nothing else; a stream the client resets, or a
connection that drops, cancels what serves it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from grpc_health.v1 import health_pb2

from .grpc_wire import (
    INTERNAL,
    NOT_FOUND,
    UNIMPLEMENTED,
    Closed,
    Connection,
    HalfClosed,
    Message,
    Refused,
    Reset,
    Started,
)

log = logging.getLogger("extproc.grpc")

Answer = bytes | AsyncIterator[bytes] | None


class GrpcStatus(Exception):
    """End the stream with this status (a call's way to refuse)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code, self.message = code, message


class Call(Protocol):
    def message(self, data: bytes) -> Answer:
        """The answer to one message: bytes now, an async iterator of them later, or none."""

    def end(self) -> bytes | None:
        """The client sent its last message: a last answer (a unary or client-streaming
        method's reply), or none."""


Method = Callable[[dict[bytes, bytes]], Call]


class _Served:
    __slots__ = ("backlog", "call", "half_closed", "task")

    def __init__(self, call: Call):
        self.call = call
        self.task: asyncio.Task[None] | None = None
        self.backlog: deque[bytes] = deque()
        self.half_closed = False


class _Link(asyncio.Protocol):
    """One connection: the wire's events to calls, their answers to the socket."""

    def __init__(self, server: GrpcServer):
        self.server = server
        self.wire = Connection(server.max_message)
        self.served: dict[int, _Served] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.links.add(self)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.links.discard(self)
        for s in self.served.values():
            if s.task is not None:
                s.task.cancel()
        self.served.clear()

    def flush(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        data = self.wire.data_to_send()
        if data:
            t.write(data)
        if self.wire.closed:
            t.close()

    def data_received(self, data: bytes) -> None:
        for ev in self.wire.receive(data):
            if isinstance(ev, Message):
                s = self.served.get(ev.stream_id)
                if s is None:
                    continue
                if s.task is not None:
                    s.backlog.append(ev.data)
                else:
                    self._serve(ev.stream_id, s, ev.data)
            elif isinstance(ev, Started):
                self._open(ev)
            elif isinstance(ev, HalfClosed):
                s = self.served.get(ev.stream_id)
                if s is not None:
                    s.half_closed = True
                    if s.task is None:
                        self._end(ev.stream_id, s)
            elif isinstance(ev, (Reset, Refused)):
                s = self.served.pop(ev.stream_id, None)
                if s is not None and s.task is not None:
                    s.task.cancel()
            elif isinstance(ev, Closed):
                self.connection_lost(None)
        self.flush()

    def _open(self, ev: Started) -> None:
        method = self.server.methods.get(ev.path)
        if method is None:
            self.wire.finish(ev.stream_id, UNIMPLEMENTED, "unknown method")
            return
        try:
            self.served[ev.stream_id] = _Served(method(ev.headers))
        except Exception as exc:
            self._failed(ev.stream_id, exc)

    def _failed(self, stream_id: int, exc: BaseException) -> None:
        if isinstance(exc, GrpcStatus):
            self.wire.finish(stream_id, exc.code, exc.message)
        else:
            log.error("grpc call failed", exc_info=exc,
                      extra={"fields": {"event": "grpc.call_failed"}})
            self.wire.finish(stream_id, INTERNAL, "internal error")
        self.served.pop(stream_id, None)

    def _serve(self, stream_id: int, s: _Served, data: bytes) -> None:
        """One message, answered now when the call can; else its task takes the stream."""
        try:
            answer = s.call.message(data)
        except Exception as exc:
            self._failed(stream_id, exc)
            return
        self.wire.consumed(stream_id)
        if answer is None:
            return
        if isinstance(answer, bytes):
            self.wire.reply(stream_id, answer)
            return
        s.task = asyncio.get_running_loop().create_task(self._drain(stream_id, s, answer))

    async def _drain(self, stream_id: int, s: _Served, answer: AsyncIterator[bytes]) -> None:
        """The waiting answer, then the messages queued behind it, in order."""
        try:
            while True:
                async for out in answer:
                    self.wire.reply(stream_id, out)
                    self.flush()
                while s.backlog:
                    nxt = s.call.message(s.backlog.popleft())
                    self.wire.consumed(stream_id)
                    if isinstance(nxt, bytes):
                        self.wire.reply(stream_id, nxt)
                    elif nxt is not None:
                        answer = nxt
                        break
                else:
                    break
            s.task = None
            if s.half_closed:
                self._end(stream_id, s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(stream_id, exc)
        self.flush()

    def _end(self, stream_id: int, s: _Served) -> None:
        try:
            last = s.call.end()
        except Exception as exc:
            self._failed(stream_id, exc)
            return
        if last is not None:
            self.wire.reply(stream_id, last)
        self.wire.finish(stream_id)
        self.served.pop(stream_id, None)

    def idle(self) -> bool:
        return not self.served and self.wire.idle()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GrpcServer:
    """Methods by path (``/package.Service/Method``), served on a TCP address and, if asked,
    a Unix socket."""

    def __init__(self, methods: dict[str, Method], max_message: int):
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.max_message = max_message
        self.links: set[_Link] = set()
        self.listeners: list[asyncio.base_events.Server] = []
        self.unix_path: str | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; the port bound (``port`` 0: a free one)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(lambda: _Link(self), host, port)
        self.listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        """Listen on a Unix socket too. A socket an earlier run left at ``path`` is replaced;
        any other file there is an error (never removed)."""
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self.listeners.append(await loop.create_unix_server(lambda: _Link(self), path))
        self.unix_path = path

    async def stop(self, grace: float | None) -> None:
        """Stop listening, tell every client no new stream (GOAWAY), let open streams finish
        for up to ``grace`` seconds, then cut what is left."""
        for listener in self.listeners:
            listener.close()
        if self.unix_path is not None and os.path.lexists(self.unix_path):
            os.unlink(self.unix_path)
        for link in list(self.links):
            link.wire.shutdown()
            link.flush()
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        while any(not link.idle() for link in self.links) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for link in list(self.links):
            link.close()
            link.connection_lost(None)


class Health:
    """grpc.health.v1 ``Check``: what a container's probe and ``extproc health`` ask."""

    PATH = "/grpc.health.v1.Health/Check"

    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    def set(self, service: str, serving: bool) -> None:
        self.status[service] = health_pb2.HealthCheckResponse.SERVING if serving \
            else health_pb2.HealthCheckResponse.NOT_SERVING

    def open(self, headers: dict[bytes, bytes]) -> Call:
        return _HealthCheck(self)


class _HealthCheck:
    def __init__(self, health: Health):
        self.health, self.service = health, ""

    def message(self, data: bytes) -> Answer:
        self.service = health_pb2.HealthCheckRequest.FromString(data).service
        return None

    def end(self) -> bytes:
        status = self.health.status.get(self.service)
        if status is None:
            raise GrpcStatus(NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()
