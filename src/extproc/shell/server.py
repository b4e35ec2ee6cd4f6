"""The thin gRPC shell: maps Envoy ext_proc messages to the core and back.

One ExternalProcessor serves both stages; Envoy says which in the ``x-extproc-stage`` initial
metadata. A stream handler never lets an exception escape (Envoy would turn it into a bare 500):
it logs the traceback and answers with a JSON 500 naming the request id. The gRPC server is our
own (``grpc_server``, ``grpc_wire``): it costs a fraction of grpc.aio per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable

import httpx
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .. import metrics
from ..config import ConfigError, backend_endpoint, load_config
from ..contract import STAGE_KEY
from ..core.backends import MissingCredential
from ..core.health import probe_path
from ..effects.discovery import Discoverer
from ..lane.build import settled
from ..logs import log_event
from ..render import render
from ..runtime import Runtime
from . import lane_records
from .attempt_stage import AttemptStream
from .decision_log import DecisionLog
from .grpc_server import Answer, Call, GrpcServer, Health
from .route_stage import RouteStream

log = logging.getLogger("extproc")


class Processor:
    """Envoy's ext_proc streams: the stage Envoy names in the ``x-extproc-stage`` initial
    metadata decides which handler serves one; ``rt`` is swapped on reload (a stream keeps the
    runtime it started with)."""

    PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def open(self, headers: dict[bytes, bytes]) -> Call:
        if headers.get(_STAGE) == b"attempt":
            return _AttemptCall(AttemptStream(self.rt, log))
        return _RouteCall(RouteStream(self.rt))


_STAGE = STAGE_KEY.encode()


def _failed(stage: str, request_id: str) -> None:
    log.exception("servicer error", extra={"fields": {
        "event": "servicer.error", "stage": stage, "request_id": request_id}})


class _StageCall:
    """One stage's stream as a gRPC call: its handler answers each message; nothing is sent
    at the end."""

    __slots__ = ("handler",)

    def __init__(self, handler: RouteStream | AttemptStream):
        self.handler = handler

    def end(self) -> None:
        return None


class _RouteCall(_StageCall):
    """The route stage: one answer per message, computed at once (the hot path), except for a
    body adapted here (its answers may wait on aux calls or fetches). Never raises: a failure
    is logged and answered with a JSON 500 naming the request id."""

    __slots__ = ()
    handler: RouteStream

    def message(self, data: bytes) -> Answer:
        t0 = time.perf_counter()
        req = pb.ProcessingRequest.FromString(data)
        try:
            out = self.handler.respond(req)
        except Exception:
            _failed("route", self.handler.request_id)
            out = self.handler.fail()
        if isinstance(out, pb.ProcessingResponse):
            _observe("route", req, t0)
            return out.SerializeToString()
        if out is None:
            return None
        return _encoded("route", self.handler, out, req, t0)


class _AttemptCall(_StageCall):
    """The attempt stage: its answers as the handler yields them; never raises (as above)."""

    __slots__ = ()
    handler: AttemptStream

    def message(self, data: bytes) -> Answer:
        t0 = time.perf_counter()
        req = pb.ProcessingRequest.FromString(data)
        return _encoded("attempt", self.handler, self.handler.handle(req), req, t0)


async def _encoded(stage: str, handler: RouteStream | AttemptStream,
                   answers: AsyncIterator[pb.ProcessingResponse], req: pb.ProcessingRequest,
                   t0: float) -> AsyncIterator[bytes]:
    """Answers that wait, each encoded as it comes; a failure is logged and answered with the
    handler's JSON 500."""
    try:
        async for answer in answers:
            yield answer.SerializeToString()
    except Exception:
        _failed(stage, handler.request_id)
        yield handler.fail().SerializeToString()
    _observe(stage, req, t0)


def _observe(stage: str, req: pb.ProcessingRequest, t0: float) -> None:
    metrics.stage_seconds(stage, req.WhichOneof("request") or "-").observe(
        time.perf_counter() - t0)


class Reloader:
    """Reload the config on SIGHUP or when the file changes. A bad config is refused with a
    logged error and the old one keeps serving; streams already open finish on the runtime they
    started with (each handler holds its own reference). ``lane``: the fast lane the service
    was started for (``serve --lane``), settled the same way in every config it reloads."""

    def __init__(self, path: str, processor: Processor, lane: bool | None = None):
        self.path, self.processor, self.lane = path, processor, lane
        self.mtime = self._mtime()

    def _mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    def reload(self, why: str) -> bool:
        old = self.processor.rt
        try:
            cfg = load_config(self.path)
            if self.lane is not None:
                cfg = settled(cfg, self.lane)
            rt = Runtime.build(cfg, previous=old)
        except Exception as exc:  # whatever it is, the old config keeps serving
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)] \
                if isinstance(exc, MissingCredential) else [f"{exc.__class__.__name__}: {exc}"]
            log_event(log, {"event": "config.reload_refused", "why": why, "path": self.path,
                            "problems": problems}, logging.ERROR)
            return False
        notes = []
        if cfg.service != old.config.service:
            notes.append("service settings (ports, limits) change only on restart")
        if render(cfg)["static_resources"] != render(old.config)["static_resources"]:
            notes.append("the rendered Envoy config differs (backends, limits): run "
                         "`extproc envoy` and reload Envoy")
        self.processor.rt = rt
        log_event(log, {"event": "config.reloaded", "why": why, "path": self.path,
                        "models": rt.table.public_names(), "notes": notes})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            mtime = self._mtime()
            if mtime and mtime != self.mtime:
                self.mtime = mtime
                try:
                    self.reload("file changed")
                except Exception:  # the watch must outlive any one reload
                    log.exception("config reload", extra={"fields": {
                        "event": "config.reload_refused", "why": "file changed"}})


def tune_allocator() -> Callable[[], None] | None:
    """glibc malloc, for a process whose multi-MB bodies come and go: two arenas (not 8 per
    core) bound what the worker threads (audio decoding) hold, and the returned ``trim`` (run
    every few seconds) gives freed heap pages back to the OS, so resident memory stays flat
    without paying an mmap per body. Measured with ``make soak``. None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    m_arena_max = -8
    mallopt(m_arena_max, 2)
    return lambda: malloc_trim(0)


async def _trim_every(trim: Callable[[], None], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        trim()


async def probe_round(rt: Runtime, clients: dict[str, httpx.AsyncClient]) -> None:
    """Probe every backend that has a probe once; transitions are logged as
    ``backend.health`` lines. The service reaches backends directly (Envoy's own health checks
    could not drive our per-request order)."""

    async def one(name: str, url: str, ca: str | None) -> None:
        client = clients.get(ca or "")
        if client is None:
            client = clients[ca or ""] = httpx.AsyncClient(
                verify=ssl.create_default_context(cafile=ca) if ca else True, trust_env=False)
        try:
            resp = await client.get(url, timeout=rt.config.health.timeout_s)
            ok, why = 200 <= resp.status_code < 300, f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, f"{exc.__class__.__name__}"
        mono, wall = time.monotonic(), time.time()
        moved = rt.health.probed(name, ok, why, mono, wall)
        if moved:
            log_event(log, {"event": "backend.health", **rt.health.state(name, mono),
                            "became": moved}, logging.INFO if ok else logging.WARNING)

    cfg = rt.config
    probes = []
    for b in cfg.backends:
        path = probe_path(cfg, b.name)
        if path is None:
            continue
        ep = backend_endpoint(b.url)
        url = f"{ep.scheme}://{ep.hostname or ep.host}:{ep.port}{path}"
        ca = (b.tls_ca_file or cfg.envoy.ca_bundle) if ep.scheme == "https" else None
        probes.append(one(b.name, url, ca))
    await asyncio.gather(*probes)


async def probe_backends(runtime: Callable[[], Runtime]) -> None:
    """Probe every ``health.interval_s``, off any request's path."""
    clients: dict[str, httpx.AsyncClient] = {}
    try:
        while True:
            rt = runtime()
            await probe_round(rt, clients)
            await asyncio.sleep(rt.config.health.interval_s)
    finally:
        for client in clients.values():
            await client.aclose()


async def survey(rt: Runtime) -> Runtime:
    """One discovery poll and one probe round, for a command that shows what the service
    would see (``extproc models``): the runtime rebuilt with what was found."""
    discoverer, clients = Discoverer(), {}
    try:
        catalog = await discoverer.poll(rt, time.monotonic())
        rt = Runtime.build(rt.config, previous=rt, catalog=catalog)
        await probe_round(rt, clients)
        return rt
    finally:
        await discoverer.close()
        for client in clients.values():
            await client.aclose()


async def discover_models(processor: Processor) -> None:
    """Poll backends for their models and rebuild the routing table when what they serve
    changes (the config as it is, the catalog as found); requests in flight finish on the
    table they started with."""
    discoverer = Discoverer()
    discoverer.catalog = processor.rt.table.catalog
    try:
        while True:
            rt = processor.rt
            catalog = await discoverer.poll(rt, time.monotonic())
            if catalog != rt.table.catalog and processor.rt is rt:  # (not reloaded meanwhile)
                try:
                    new = Runtime.build(rt.config, previous=rt, catalog=catalog)
                except Exception:  # the table in place keeps serving
                    log.exception("discovery rebuild", extra={"fields": {
                        "event": "discovery.rebuild_failed"}})
                else:
                    before, after = rt.table.routes(), new.table.routes()
                    processor.rt = new
                    log_event(log, {"event": "discovery.changed",
                                    "added": sorted(after - before),
                                    "removed": sorted(before - after)})
            await asyncio.sleep(discoverer.wait(rt, time.monotonic()))
    finally:
        await discoverer.close()


async def serve(rt: Runtime, host: str | None = None, port: int | None = None,
                config_path: str | None = None, metrics_port: int | None = None,
                trim: Callable[[], None] | None = None, unix_socket: str | None = None,
                lane_socket: str | None = None, lane: bool | None = None) -> None:
    """Run until SIGTERM/SIGINT; in-flight streams get the configured grace period. Serves on
    ``unix_socket`` too, when given, and receives the compiled lane's records on
    ``lane_socket``; ``lane``: the Envoy in front runs the compiled lane (true) or the Lua one
    (``serve --lane``; None: as the config says)."""
    cfg = rt.config.service
    max_bytes = cfg.max_message_bytes
    processor = Processor(rt)
    health = Health()
    decision_log = DecisionLog(lambda: processor.rt, log)
    server = GrpcServer({
        Processor.PATH: processor.open,
        DecisionLog.PATH: decision_log.open,
        Health.PATH: health.open,
    }, max_bytes)
    addr = f"{host or cfg.host}:{port or cfg.port}"
    if unix_socket:  # (first: once the port answers, the socket is there too)
        await server.start_unix(unix_socket)
    records = await lane_records.receive(lane_socket, decision_log) if lane_socket else None
    await server.start(host or cfg.host, port or cfg.port)
    metrics.start(cfg.metrics_port if metrics_port is None else metrics_port, cfg.host)
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        health.set(name, True)
    log_event(log, {"event": "service.started", "address": addr, "unix_socket": unix_socket,
                    "metrics_port": cfg.metrics_port or None,
                    "models": rt.table.public_names()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    trimmer = asyncio.create_task(_trim_every(trim, 5.0)) if trim else None
    warming = asyncio.create_task(rt.schema_judge.warm())  # not on a request's path
    prober = asyncio.create_task(probe_backends(lambda: processor.rt))
    discoverer = asyncio.create_task(discover_models(processor))
    if config_path:
        reloader = Reloader(config_path, processor, lane)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        if cfg.reload_watch_s:
            watcher = asyncio.create_task(reloader.watch(cfg.reload_watch_s))
    await stop.wait()
    for task in (watcher, trimmer, prober, discoverer):
        if task:
            task.cancel()
    log_event(log, {"event": "service.stopping", "grace_s": cfg.shutdown_grace_s})
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        health.set(name, False)
    await server.stop(cfg.shutdown_grace_s)
    if records:  # (its file removed too: the lane waits for the next listener either way)
        records.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lane_socket)
    warming.cancel()
    await processor.rt.schema_judge.close()
    log_event(log, {"event": "service.stopped"})
