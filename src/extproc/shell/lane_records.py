"""The compiled lane's records (lane/lane.c): batches of tab-separated lines on a Unix
datagram socket, one line per fast request, each completed into the same decision record and
metrics the access log's entries give (``decision_log.lane_record`` is that completion).

Why not complete each line as the access log's entries are: at the lane's rates that costs the
service ~15 us of Python per request, on the same cores as Envoy (measured: 0.64x bare Envoy's
req/s instead of ~1.0x without it). Fast requests come in few *shapes*: the same path, names,
status, headers and set of figures, differing only in the request id, timings and usage. So a
shape's record is completed once, by ``lane_record`` itself, with sentinel values in the
varying fields and serialised; each line is then its template with the values put in, its
counter counted per batch, its histograms and health fed as ``account`` and ``observe`` would.
tests/unit/test_lane_records.py checks the two agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any

import orjson

from .. import metrics
from ..contract import Meta
from ..core.decision import usage
from ..core.health import answered_by, observe
from ..logs import write_json
from ..runtime import Runtime
from .decision_log import LANE_FIELDS, DecisionLog, health_event, labels, lane_record

_N = len(LANE_FIELDS)
_TIMINGS = ((11, "to_first_backend_byte"), (12, "to_first_client_byte"), (13, "total"))
_FIGURES = ((14, Meta.USAGE_IN), (15, Meta.USAGE_OUT), (16, Meta.FIRST_TOKEN_US),
            (17, Meta.LAST_US))
# What makes a shape, besides which timings and figures a line has (19, Retry-After, is per
# line)
_key = itemgetter(2, 3, 4, 5, 6, 7, 8, 9, 18, 20, 21)
_RID = "\x00request id\x00"
# Values no record holds, by slot: each found once in a shape's serialised record.
_SENTINEL = {"to_first_backend_byte": 9999991.25, "to_first_client_byte": 9999992.25,
             "total": 9999993.25, "input_tokens": 9999994, "output_tokens": 9999995,
             "ttft_ms": 9999996.25, "tpot_ms": 9999997.25}
MAX_SHAPES = 4096  # (then forgotten and learned again: a bound, whatever the socket is sent)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True, eq=False)  # (counted by identity)
class Shape:
    template: str                  # the serialised record: {0} the request id, {n} slots[n-1]
    slots: tuple[str, ...]         # the timings' and usage figures' names it has
    rec: dict[str, Any]            # the completed record (sentinels in it): health's input
    counter: Any                   # its requests counter child
    labels: tuple[str, str, str, str]  # its usage metrics' labels
    answered: str | None           # health.answered_by: told many at once


def _shape(values: list[str], timings: dict[str, float], figures: dict[str, Any],
           rt: Runtime) -> Shape:
    line = list(values)
    line[1] = _RID
    for i, name in _TIMINGS:
        line[i] = repr(_SENTINEL[name]) if name in timings else ""
    rec, _ = lane_record("\t".join(line), rt)
    rec["usage"] = {k: _SENTINEL[k] for k in figures}
    text = _json(rec)
    slots = tuple(k for k in _SENTINEL if k in timings or k in figures)
    tokens = [(0, _json(_RID)), *((n, f":{_json(_SENTINEL[k])}")
                                  for n, k in enumerate(slots, 1))]
    marks = sorted((text.index(token), n, token) for n, token in tokens)
    template, at = [], 0
    for pos, n, token in marks:
        lead = 1 if token.startswith(":") else 0  # (the colon stays in the part)
        template += [text[at:pos + lead].replace("{", "{{").replace("}", "}}"), f"{{{n}}}"]
        at = pos + len(token)
    template.append(text[at:].replace("{", "{{").replace("}", "}}"))
    public, backend, model = labels(rec)
    return Shape("".join(template), slots, rec,
                 metrics.requests(public, backend, model, rec["outcome"]),
                 (public, model, backend, rec.get("client") or "-"), answered_by(rec))


class LaneRecords(asyncio.DatagramProtocol):
    """Receives the lane's batches. A line that is not a record (anyone on the host who may
    write to the socket could send one) is counted as lost, as are the lines the lane could
    not send (its ``D`` line says how many)."""

    def __init__(self, log: DecisionLog):
        self.log = log
        self.shapes: dict[tuple[Any, ...], Shape] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        rt = self.log.runtime()
        texts, health = [], []
        shapes: dict[Shape, list[dict[str, Any]]] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("D\t") and line[2:].isdigit():
                metrics.LANE_RECORDS_LOST.inc(int(line[2:]))
                continue
            try:
                shape, text, figures, retry_after = self._one(line, rt)
            except (ValueError, KeyError, IndexError):
                metrics.LANE_RECORDS_LOST.inc()
                continue
            texts.append(text)
            shapes.setdefault(shape, []).append(figures)
            health.append((shape, retry_after))
        for shape, many in shapes.items():  # (counted per shape: a batch at a time)
            shape.counter.inc(len(many))
            metrics.usages(many, *shape.labels)
        events, mono, wall = [], time.monotonic(), time.time()
        # (answers in a row from one backend are told at once; anything else in its order)
        for backend, run in groupby(health, key=lambda pair: pair[0].answered):
            if backend:
                rt.health.answered(backend, sum(1 for _ in run))
                continue
            for shape, retry_after in run:
                for name, state in observe(rt.health, shape.rec, retry_after, mono, wall):
                    events.append(health_event(rt, name, state, mono))
        write_json(self.log.log, texts, events)

    def _one(self, line: str, rt: Runtime) -> tuple[Shape, str, dict[str, Any], str | None]:
        v = line.split("\t")
        if len(v) != _N or v[0] != "L1":
            raise ValueError("not a lane record")
        timings = {name: float(v[i]) for i, name in _TIMINGS if v[i]}
        figures = usage({key: v[i] for i, key in _FIGURES if v[i]}, int(v[10]))
        key = (*_key(v), *timings, *figures)
        shape = self.shapes.get(key)
        if shape is None:
            if len(self.shapes) >= MAX_SHAPES:
                self.shapes.clear()
            shape = self.shapes[key] = _shape(v, timings, figures, rt)
        # (the numbers serialised at once: none holds a comma)
        numbers = [timings[k] if k in timings else figures[k] for k in shape.slots]
        text = shape.template.format(
            _json(v[1]), *(orjson.dumps(numbers)[1:-1].decode().split(",") if numbers else ()))
        return shape, text, figures, v[19] or None


async def receive(path: str, log: DecisionLog) -> asyncio.DatagramTransport:
    """Binds the compiled lane's socket (a stale one from an earlier run is replaced; only
    this user may write to it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: LaneRecords(log), sock=sock)
    return transport


__all__ = ["MAX_SHAPES", "LaneRecords", "receive"]
