"""The thin gRPC shell: maps Envoy ext_proc messages to the core and back.

One ExternalProcessor serves both stages; Envoy says which in the ``x-extproc-stage`` initial
metadata. A stream handler never lets an exception escape (Envoy would turn it into a bare 500):
it logs the traceback and answers with a JSON 500 naming the request id.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import metrics
from .logs import log_event
from .messages import STAGE_KEY
from .runtime import Runtime
from .stages import AttemptStream, RouteStream

log = logging.getLogger("extproc")


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stage = "route"
        for md in context.invocation_metadata() or ():
            if md.key == STAGE_KEY:
                stage = str(md.value)
        handler: RouteStream | AttemptStream = (
            AttemptStream(self.rt, log) if stage == "attempt" else RouteStream(self.rt, log)
        )
        try:
            async for req in request_iterator:
                t0 = time.perf_counter()
                try:
                    async for out in handler.handle(req):
                        yield out
                except Exception:
                    log.exception("servicer error", extra={"fields": {
                        "event": "servicer.error", "stage": stage,
                        "request_id": handler.request_id}})
                    yield handler.fail()
                metrics.STAGE_SECONDS.labels(stage, req.WhichOneof("request") or "-").observe(
                    time.perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream error", extra={"fields": {"event": "stream.error"}})
        finally:
            try:
                handler.close()
            except Exception:
                log.exception("close error", extra={"fields": {"event": "close.error"}})


async def serve(rt: Runtime, host: str | None = None, port: int | None = None) -> None:
    """Run until SIGTERM/SIGINT; in-flight streams get the configured grace period."""
    cfg = rt.config.service
    max_bytes = cfg.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(rt), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = f"{host or cfg.host}:{port or cfg.port}"
    bound = server.add_insecure_port(addr)
    if bound == 0:
        raise OSError(f"cannot bind {addr}")
    await server.start()
    metrics.start(cfg.metrics_port, cfg.host)
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event(log, {"event": "service.started", "address": addr,
                    "metrics_port": cfg.metrics_port or None,
                    "models": rt.table.public_names()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, {"event": "service.stopping", "grace_s": cfg.shutdown_grace_s})
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(cfg.shutdown_grace_s)
    log_event(log, {"event": "service.stopped"})
