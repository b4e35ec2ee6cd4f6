"""The cost floor: an ext_proc that answers every message without looking at it.

Benchmark case (b): Envoy + this processor (request headers SEND, body BUFFERED) -> emulator.
Whatever llm-extproc costs above this is our own work; below it is the price of a Python gRPC
stream per request, on the same gRPC server the service runs (extproc.shell.grpc_server; until
2026-12-04 both ran grpc.aio, 3-6x the CPU per stream: docs/benchmark.md).

    python bench/empty_extproc.py --port 50099
"""

from __future__ import annotations

import argparse
import asyncio

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.shell.grpc_server import Answer, GrpcServer

_ANSWERS = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
}
_BYTES = {kind: answer.SerializeToString() for kind, answer in _ANSWERS.items()}


class Empty:
    def open(self, headers: dict[bytes, bytes]) -> Empty:
        return self

    def message(self, data: bytes) -> Answer:
        return _BYTES.get(pb.ProcessingRequest.FromString(data).WhichOneof("request") or "")

    def end(self) -> None:
        return None


async def serve(port: int) -> None:
    server = GrpcServer({"/envoy.service.ext_proc.v3.ExternalProcessor/Process": Empty().open},
                        64 << 20)
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(serve(ap.parse_args().port))
