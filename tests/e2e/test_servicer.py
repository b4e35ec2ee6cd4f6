"""The gRPC servicer, served by our own gRPC server, over a real grpc.aio channel (gRPC's own
client: the server must speak HTTP/2 as it expects), fed the messages Envoy sends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from extproc.config import parse_config
from extproc.contract import ATTR_ADDRESS, ATTR_ATTEMPT, Meta, attribute
from extproc.runtime import Runtime
from extproc.shell.grpc_server import GrpcServer
from extproc.shell.server import Processor

CFG = parse_config({
    "backends": [
        {"name": "a", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m1"}]},
        {"name": "b", "url": "http://127.0.0.1:8002/v1", "models": [{"name": "m2"}],
         "api_key_env": "B_KEY"},
    ],
    "models": [{"name": "pub", "candidates": [{"backend": "a", "model": "m1"},
                                              {"backend": "b", "model": "m2"}]}],
})


def hdrs(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]),
        end_of_stream=eos)


@pytest.fixture
async def stub() -> AsyncIterator[pb_grpc.ExternalProcessorStub]:
    server = GrpcServer({Processor.PATH: Processor(Runtime.build(CFG, env={"B_KEY": "sek"})).open},
                        1 << 20)
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield pb_grpc.ExternalProcessorStub(ch)
    await server.stop(None)


async def exchange(stub: pb_grpc.ExternalProcessorStub, stage: str,
                   msgs: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    call = stub.Process(metadata=(("x-extproc-stage", stage),))
    out = []
    for m in msgs:
        await call.write(m)
        out.append(await call.read())
    await call.done_writing()
    return out


POST = {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": "rid-1"}


async def test_route_stage_sets_cluster_order_and_metadata(stub) -> None:
    body = orjson.dumps({"model": "pub", "messages": []})
    r_hdr, r_body = await exchange(stub, "route", [
        pb.ProcessingRequest(request_headers=hdrs(POST)),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ])
    assert r_hdr.WhichOneof("response") == "request_headers"
    common = r_body.request_body.response
    assert common.clear_route_cache
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert sets == {"x-extproc-cluster": "llm_backends", "x-envoy-max-retries": "1"}
    meta = r_body.dynamic_metadata.fields["extproc"].struct_value.fields
    assert meta["hosts"].string_value == "127.0.0.1:8001,127.0.0.1:8002"
    assert orjson.loads(meta["candidates"].string_value)[1] == ["b", "m2", "127.0.0.1:8002"]


async def test_route_stage_unknown_model_is_immediate_404(stub) -> None:
    _, r = await exchange(stub, "route", [
        pb.ProcessingRequest(request_headers=hdrs(POST)),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model":"x"}', end_of_stream=True)),
    ])
    assert r.immediate_response.status.code == 404
    assert orjson.loads(r.immediate_response.body)["error"]["code"] == "model_not_found"


def attempt_req(attempt: int, address: str, candidates: str, body_model: str = '"pub"'
                ) -> pb.ProcessingRequest:
    attrs = struct_pb2.Struct()
    attrs.update({ATTR_ADDRESS: address, ATTR_ATTEMPT: float(attempt),
                  attribute(Meta.CANDIDATES): candidates,
                  attribute(Meta.BODY_MODEL): body_model})
    return pb.ProcessingRequest(
        request_headers=hdrs({**POST, "authorization": "Bearer client"}),
        attributes={"envoy.filters.http.ext_proc": attrs})


CANDS = orjson.dumps([["a", "m1", "127.0.0.1:8001"], ["b", "m2", "127.0.0.1:8002"]]).decode()


async def test_attempt_stage_rewrites_model_and_injects_key(stub) -> None:
    body = b'{"model": "pub", "messages": []}'
    r_hdr, r_body, r_resp = await exchange(stub, "attempt", [
        attempt_req(2, "127.0.0.1:8002", CANDS),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=hdrs({":status": "200"})),
    ])
    mut = r_hdr.request_headers.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mut.set_headers} == {
        "authorization": b"Bearer sek"}
    new = r_body.request_body.response.body_mutation.body
    assert orjson.loads(new) == {"model": "m2", "messages": []}
    cl = r_body.request_body.response.header_mutation.set_headers[0].header
    assert (cl.key, cl.raw_value) == ("content-length", str(len(new)).encode())
    sets = {h.header.key: h.header.raw_value for h in
            r_resp.response_headers.response.header_mutation.set_headers}
    assert sets == {"x-extproc-backend": b"b", "x-extproc-model": b"m2"}


async def test_attempt_stage_skips_body_when_model_unchanged(stub) -> None:
    (r,) = await exchange(stub, "attempt", [attempt_req(1, "127.0.0.1:8001", CANDS, '"m1"')])
    assert r.mode_override.request_body_mode == 0  # NONE: the body is not sent to us at all
    assert "authorization" in r.request_headers.response.header_mutation.remove_headers


async def test_internal_error_is_json_500_with_request_id(stub) -> None:
    (r,) = await exchange(stub, "attempt", [attempt_req(1, "127.0.0.1:8001", "[[broken")])
    assert r.immediate_response.status.code == 500
    e = orjson.loads(r.immediate_response.body)["error"]
    assert e["code"] == "internal_error" and e["request_id"] == "rid-1"
    assert "rid-1" in e["message"]


async def test_attempt_without_routing_decision_is_refused(stub) -> None:
    (r,) = await exchange(stub, "attempt", [attempt_req(1, "127.0.0.1:8001", "")])
    assert r.immediate_response.status.code == 502


async def test_sigterm_lets_in_flight_stream_finish(tmp_path) -> None:
    """A stream open when SIGTERM arrives still gets its answers; then the process exits 0."""
    import asyncio
    import signal
    import subprocess
    import sys

    import yaml

    from extproc_dev.stack import free_port, wait_port

    port = free_port()
    cfg = {"service": {"port": port, "shutdown_grace_s": 5, "metrics_port": 0},
           "backends": [{"name": "a", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m1"}]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--config",
                             str(tmp_path / "c.yaml")], stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process(metadata=(("x-extproc-stage", "route"),))
            await call.write(pb.ProcessingRequest(request_headers=hdrs(POST)))
            assert (await call.read()).WhichOneof("response") == "request_headers"
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(
                body=b'{"model": "m1"}', end_of_stream=True)))
            resp = await call.read()
            assert resp.request_body.response.clear_route_cache
            await call.done_writing()
        assert proc.wait(timeout=10) == 0
        assert b"service.stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_ai_gateway_mode_sets_model_header_and_canonical_body_model() -> None:
    cfg = parse_config({
        "backends": [{"name": "a", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m1"}]}],
        "models": [{"name": "canonical", "aliases": ["nick"],
                    "candidates": [{"backend": "a", "model": "m1"}]}],
        "ai_gateway": {"model_header": "x-ai-eg-model"}})
    server = GrpcServer({Processor.PATH: Processor(Runtime.build(cfg, env={})).open}, 1 << 20)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            body = b'{"model": "nick", "messages": [] }'
            _, r = await exchange(pb_grpc.ExternalProcessorStub(ch), "route", [
                pb.ProcessingRequest(request_headers=hdrs(POST)),
                pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))])
    finally:
        await server.stop(None)
    common = r.request_body.response
    sets = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    assert sets["x-ai-eg-model"] == b"canonical"
    assert common.body_mutation.body == b'{"model": "canonical", "messages": [] }'  # spliced
    assert sets["content-length"] == str(len(common.body_mutation.body)).encode()


async def test_reloader_survives_any_build_failure(tmp_path, monkeypatch) -> None:
    """Whatever building a new runtime raises, the reload is refused with a log line and the
    old runtime keeps serving; the file watch goes on to pick up the next edit."""
    import asyncio
    import os

    import yaml

    from extproc.shell import server as service

    path = tmp_path / "config.yaml"
    raw = {"backends": [{"name": "a", "url": "http://127.0.0.1:8001/v1",
                         "models": [{"name": "m1"}]}]}
    path.write_text(yaml.safe_dump(raw))
    old = Runtime.build(parse_config(raw))
    proc = Processor(old)
    reloader = service.Reloader(str(path), proc)
    logged: list[dict] = []
    monkeypatch.setattr(service, "log_event", lambda _log, fields, *a: logged.append(fields))
    real_build = Runtime.build

    def broken(*a: object, **kw: object) -> Runtime:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(Runtime, "build", broken)
    watch = asyncio.create_task(reloader.watch(0.05))
    try:
        path.write_text(yaml.safe_dump({**raw, "default_model": "m1"}))
        os.utime(path, (1, 1))
        for _ in range(100):
            if logged:
                break
            await asyncio.sleep(0.02)
        assert logged[0]["event"] == "config.reload_refused"
        assert logged[0]["problems"] == ["RuntimeError: something nobody expected"]
        assert proc.rt is old and not watch.done()
        monkeypatch.setattr(Runtime, "build", real_build)
        os.utime(path, (2, 2))
        for _ in range(100):
            if proc.rt is not old:
                break
            await asyncio.sleep(0.02)
        assert proc.rt is not old and proc.rt.config.default_model == "m1"
    finally:
        watch.cancel()
