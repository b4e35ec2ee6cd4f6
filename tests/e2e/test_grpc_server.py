"""Our gRPC server (shell/grpc_server.py) on a real socket, driven by gRPC's own client
(grpc.aio: its HTTP/2, flow control and BDP pings, not ours) and by `extproc health`."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.shell.grpc_server import Answer, GrpcServer, GrpcStatus, Health


class Echo:
    """A test method: echoes each message; ``slow:`` ones after a wait (as a task), ``raise``
    raises, ``refuse`` ends the stream with a status; records cancellations."""

    PATH = "/test.Echo/Chat"

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    def open(self, headers: dict[bytes, bytes]) -> Echo:
        return self

    def message(self, data: bytes) -> Answer:
        if data == b"raise":
            raise RuntimeError("a bug in a call")
        if data == b"refuse":
            raise GrpcStatus(9, "not now")
        if data.startswith(b"slow:"):
            return self._later(data)
        if data == b"hang":
            return self._hang()
        return data

    async def _later(self, data: bytes) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.05)
        yield data
        yield b"and more"

    async def _hang(self) -> AsyncIterator[bytes]:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b"never"

    def end(self) -> bytes:
        return b"bye"


def chat(ch: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return ch.stream_stream(Echo.PATH, request_serializer=None, response_deserializer=None)


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcServer, Echo, Health, str]]:
    echo, health = Echo(), Health()
    health.set("", True)
    server = GrpcServer({Echo.PATH: echo.open, Health.PATH: health.open}, 16 << 20)
    port = await server.start("127.0.0.1", 0)
    yield server, echo, health, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_answers_keep_their_order_when_some_must_wait(served) -> None:
    _, _, _, addr = served
    async with grpc.aio.insecure_channel(addr) as ch:
        call = chat(ch)()
        for m in (b"a", b"slow:b", b"c", b"slow:d", b"e"):
            await call.write(m)
        await call.done_writing()
        got = [m async for m in call]
        assert got == [b"a", b"slow:b", b"and more", b"c", b"slow:d", b"and more", b"e", b"bye"]
        assert await call.code() == grpc.StatusCode.OK


async def test_large_messages_both_ways_under_grpcs_flow_control(served) -> None:
    _, _, _, addr = served
    big = bytes(range(256)) * (40 * 1024)  # 10 MiB
    async with grpc.aio.insecure_channel(addr, options=[
            ("grpc.max_receive_message_length", 32 << 20),
            ("grpc.max_send_message_length", 32 << 20)]) as ch:
        calls = [chat(ch)() for _ in range(3)]  # at once: the connection's window is shared
        for call in calls:
            await call.write(big)
            await call.done_writing()
        for call in calls:
            assert [m async for m in call] == [big, b"bye"]


async def test_a_failing_call_ends_its_stream_only(served) -> None:
    _, _, _, addr = served
    async with grpc.aio.insecure_channel(addr) as ch:
        for bad, code in ((b"raise", grpc.StatusCode.INTERNAL),
                          (b"refuse", grpc.StatusCode.FAILED_PRECONDITION)):
            call = chat(ch)()
            await call.write(b"ok")
            assert await call.read() == b"ok"
            await call.write(bad)
            assert await call.code() == code
        unknown = ch.unary_unary("/test.Echo/Nope", request_serializer=None,
                                 response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await unknown(b"x")
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = chat(ch)()  # the connection still serves
        await call.write(b"fine")
        await call.done_writing()
        assert [m async for m in call] == [b"fine", b"bye"]


async def test_a_client_cancelling_stops_what_serves_it(served) -> None:
    _, echo, _, addr = served
    async with grpc.aio.insecure_channel(addr) as ch:
        call = chat(ch)()
        await call.write(b"hang")
        await asyncio.wait_for(echo.started.wait(), 5)
        call.cancel()
        await asyncio.wait_for(echo.cancelled.wait(), 5)


async def test_too_large_a_message_is_refused_with_its_status() -> None:
    server = GrpcServer({Echo.PATH: Echo().open}, 1000)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = chat(ch)()
            await call.write(b"x" * 1001)
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            call = chat(ch)()
            await call.write(b"x" * 1000)
            await call.done_writing()
            assert [m async for m in call] == [b"x" * 1000, b"bye"]
    finally:
        await server.stop(0)


async def test_health_check_by_grpcs_stub_and_the_cli(served) -> None:
    _, _, health, addr = served
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        r = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Check(health_pb2.HealthCheckRequest(service="other"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    async def cli(service: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc.cli", "health", "--address", addr, "--service",
            service, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
        return p.returncode or 0, out.decode()

    assert await cli("") == (0, f"{addr}: SERVING\n")
    health.set("", False)
    assert await cli("") == (1, f"{addr}: NOT_SERVING\n")
    code, out = await cli("other")
    assert code == 1 and "NOT_FOUND" in out


async def test_stop_lets_open_streams_finish_and_takes_no_new_one(served) -> None:
    server, _, _, addr = served
    async with grpc.aio.insecure_channel(addr) as ch:
        call = chat(ch)()
        await call.write(b"before")
        assert await call.read() == b"before"
        stopping = asyncio.create_task(server.stop(5))
        await asyncio.sleep(0.2)
        await call.write(b"slow:during")
        await call.done_writing()
        assert [await call.read() for _ in range(3)] == [b"slow:during", b"and more", b"bye"]
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)
        late = chat(ch)()
        assert await late.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_unix_socket_serves_too_and_is_gone_at_stop(tmp_path) -> None:
    """A socket left by an earlier run is replaced; any other file at the path is never
    removed."""
    path = tmp_path / "svc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # (a socket file nobody listens on)
    server = GrpcServer({Health.PATH: Health().open}, 1 << 20)
    await server.start("127.0.0.1", 0)
    await server.start_unix(str(path))
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # (nothing set: NOT_FOUND)
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)
    assert not path.exists()
    path.write_text("not a socket")
    other = GrpcServer({}, 1 << 20)
    with pytest.raises(FileExistsError):
        await other.start_unix(str(path))
    assert path.read_text() == "not a socket"
