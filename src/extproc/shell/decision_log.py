"""The decision log: Envoy's gRPC access log stream brings each request's decision record back
with its outcome, and this writes the one ``routing.decision`` line and the request metrics.

Why here and not in the route stage: the outcome (status, attempts, timings) is known only
after the response; having the route stage wait for response headers would cost a gRPC
message per request, where Envoy batches access log entries many to a message, off the
request's path. The record itself travels in the request's dynamic metadata, so any worker or
replica can finish it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import orjson
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import duration_pb2

from .. import metrics
from ..contract import META_NS, RESP_BACKEND, RESP_MODEL, Meta
from ..core import fast_lane
from ..core.decision import complete, usage
from ..core.health import observe
from ..logs import write_events
from ..runtime import Runtime
from .grpc_server import Answer

_SLICE = 32  # access log entries taken between two looks at the event loop

# What the response-side Lua noted (token usage, stream timestamps).
_FIGURES = (Meta.USAGE_IN, Meta.USAGE_OUT, Meta.FIRST_TOKEN_US, Meta.LAST_US)
# Envoy's timestamps for the record, in milliseconds since the request started.
_TIMINGS = (("to_first_backend_byte", "time_to_first_upstream_rx_byte"),
            ("to_first_client_byte", "time_to_first_downstream_tx_byte"),
            ("total", "duration"))


def _ms(d: duration_pb2.Duration) -> float:
    """Milliseconds to the microsecond (integer arithmetic: cheaper than ``round``)."""
    return (d.seconds * 1_000_000 + d.nanos // 1000) / 1000


def finish(entry: accesslog_pb2.HTTPAccessLogEntry, rt: Runtime) -> dict[str, Any] | None:
    """The completed record of one access log entry; None for requests we never decided on
    (refused by Envoy before the route stage, e.g. a missing client key)."""
    common = entry.common_properties
    filter_md = common.metadata.filter_metadata
    if META_NS not in filter_md:
        return None
    fields = filter_md[META_NS].fields
    value = fields.get(Meta.RECORD)
    if value is not None and value.string_value:
        decided = orjson.loads(value.string_value)
    elif Meta.FAST in fields:  # the fast lane: Envoy routed it alone (core/fast_lane.py)
        address = common.upstream_remote_address.socket_address
        decided = fast_lane.record(
            fields[Meta.PUBLIC_MODEL].string_value,
            fields[Meta.MODEL].string_value if Meta.MODEL in fields else "",
            fields[Meta.BACKEND].string_value,
            f"{address.address}:{address.port_value}" if address.address else "",
            entry.request.request_id, entry.request.path,
            fields[Meta.REQUESTED].string_value if Meta.REQUESTED in fields else "")
    else:
        return None
    timings = {}
    for name, f in _TIMINGS:
        if common.HasField(f):
            timings[name] = _ms(getattr(common, f))
    request_id = entry.request.request_id
    rec = complete(decided, entry.response.response_code.value,
                   entry.response.response_headers, common.upstream_request_attempt_count or None,
                   timings, rt.notes.pop(request_id, []) if rt.notes else [])
    start = common.start_time
    rec["usage"] = usage({k: fields[k].string_value for k in _FIGURES if k in fields},
                         start.seconds * 1_000_000 + start.nanos // 1000
                         if common.HasField("start_time") else None)
    rec["client"] = entry.request.request_headers.get(rt.config.hints.client_header) or None
    return rec


# A compiled lane record's fields (lane/lane.c, one tab-separated line per fast request).
LANE_FIELDS = ("version", "request_id", "path", "requested", "public", "served", "backend",
               "upstream", "status", "attempts", "start_us", "to_first_backend_byte",
               "to_first_client_byte", "total", Meta.USAGE_IN, Meta.USAGE_OUT,
               Meta.FIRST_TOKEN_US, Meta.LAST_US, "client", "retry_after", RESP_BACKEND,
               RESP_MODEL)


def lane_record(line: str, rt: Runtime) -> tuple[dict[str, Any], str | None]:
    """The completed record of one compiled lane line, as ``finish`` makes it from an access
    log entry, and the answer's Retry-After (ValueError: not such a line)."""
    values = line.split("\t")
    if len(values) != len(LANE_FIELDS) or values[0] != "L1":
        raise ValueError("not a lane record")
    f = dict(zip(LANE_FIELDS, values, strict=True))
    decided = fast_lane.record(f["public"], f["served"], f["backend"], f["upstream"],
                               f["request_id"], f["path"],
                               f["requested"] if f["requested"] != f["public"] else "")
    timings = {k: float(f[k]) for k, _ in _TIMINGS if f[k]}
    headers = {k: f[k] for k in (RESP_BACKEND, RESP_MODEL) if f[k]}
    rec = complete(decided, int(f["status"]), headers, int(f["attempts"]) or None, timings,
                   rt.notes.pop(f["request_id"], []) if rt.notes else [])
    rec["usage"] = usage({k: f[k] for k in _FIGURES if f[k]}, int(f["start_us"]))
    rec["client"] = f["client"] or None
    return rec, f["retry_after"] or None


def health_event(rt: Runtime, backend: str, state: str, mono: float) -> dict[str, Any]:
    """The log line of a backend's health changing (also what ``/extproc/health`` shows)."""
    return {"event": "backend.health", **rt.health.state(backend, mono), "became": state}


def labels(rec: dict[str, Any]) -> tuple[str, str, str]:
    """A completed record's public model, and the backend and model that answered last, as
    the metrics label them ("-": none)."""
    attempts = rec["attempts"]
    backend = attempts[-1].get("backend") if attempts else None
    model = attempts[-1].get("model") if attempts else None
    return rec["public_model"] or "-", backend or "-", model or "-"


def account(rec: dict[str, Any]) -> None:
    public, backend, model = labels(rec)
    metrics.requests(public, backend, model, rec["outcome"]).inc()
    if rec.get("usage"):
        metrics.usage(rec["usage"], public, model, backend, rec.get("client") or "-")
    hints = rec["hints"]
    for kind in hints.get("hints", {}):
        result = "applied" if kind in hints.get("applied", ()) else "ignored"
        metrics.HINTS.labels(kind, result).inc()
    if rec["error_code"] in ("hint_not_allowed", "unknown_hint"):
        metrics.HINTS.labels("-", "refused").inc()


class DecisionLog:
    """Receives Envoy's access log streams (one per Envoy worker thread, batched entries):
    each message is taken as it arrives, and the stream's one reply comes at its end."""

    PATH = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"

    def __init__(self, runtime: Callable[[], Runtime], log: logging.Logger):
        self.runtime, self.log = runtime, log

    def open(self, headers: dict[bytes, bytes]) -> DecisionLog:
        return self  # nothing is kept between messages

    def message(self, data: bytes) -> Answer:
        entries = als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry
        if len(entries) <= _SLICE:
            self._take(entries)
            return None
        return self._in_slices(entries)

    async def _in_slices(self, entries: Sequence[Any]) -> AsyncIterator[bytes]:
        """A large batch a slice at a time, the event loop free in between: the requests in
        flight are not held up behind it (Envoy flushes every 0.25 s; at 2,500 req/s a batch
        of ~300 entries took ~15 ms at once). Answers nothing."""
        for i in range(0, len(entries), _SLICE):
            if i:
                await asyncio.sleep(0)
            self._take(entries[i:i + _SLICE])
        return
        yield b""  # (an async generator: the server runs it as a task)

    def _take(self, entries: Iterable[Any]) -> None:
        rt = self.runtime()
        done = []
        for entry in entries:
            try:
                rec = finish(entry, rt)
                if rec is not None:
                    done.append((rec, entry.response.response_headers.get("retry-after")))
            except Exception:  # one odd entry must not end the stream
                self.log.exception("access log entry", extra={"fields": {
                    "event": "decision_log.error",
                    "request_id": entry.request.request_id}})
        self.write(rt, done)

    def write(self, rt: Runtime, done: Iterable[tuple[dict[str, Any], str | None]]) -> None:
        """Each completed record counted, logged, and told to the backends' health."""
        events = []
        mono, wall = time.monotonic(), time.time()
        for rec, retry_after in done:
            try:
                account(rec)
                events.append(rec)
                for backend, state in observe(rt.health, rec, retry_after, mono, wall):
                    events.append(health_event(rt, backend, state, mono))
            except Exception:  # one odd record must not end the stream
                self.log.exception("decision record", extra={"fields": {
                    "event": "decision_log.error", "request_id": rec.get("request_id")}})
        write_events(self.log, events)

    def end(self) -> bytes:
        return als_pb2.StreamAccessLogsResponse().SerializeToString()
