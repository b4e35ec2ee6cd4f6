"""The compiled lane's records, completed by shape (shell/lane_records.py), are what the
reference completion (``decision_log.lane_record``, the access log's shape) makes of each line:
the same decision line, the same metrics, the same health."""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from extproc import metrics
from extproc.config import Config
from extproc.runtime import Runtime
from extproc.shell.decision_log import DecisionLog, lane_record
from extproc.shell.lane_records import LaneRecords

CFG = Config.model_validate({"backends": [
    {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:8000/v1",
     "models": [{"name": "plain"}]}],
    "models": [{"name": "nice", "aliases": ["nick"],
                "candidates": [{"backend": "v", "model": "plain"}]}],
    "envoy": {"fast_lane_compiled": True}})

NUMBER = st.one_of(st.just(""), st.integers(0, 10**16).map(str))
MS = st.one_of(st.just(""), st.floats(0, 10**6, allow_nan=False).map(lambda f: f"{f:.3f}"))
START = 1_796_371_019_567_515
LINE = st.tuples(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40),
    st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/messages"]),
    st.sampled_from([("plain", "plain", "plain"), ("nick", "nice", "plain"),
                     ("nice", "nice", "plain")]),
    st.sampled_from(["127.0.0.1:8000", ""]), st.sampled_from(["200", "429", "503", "0", "404"]),
    st.sampled_from(["1", "0"]), MS, MS, MS, NUMBER, NUMBER,
    st.one_of(st.just(""), st.integers(START - 10, START + 10**7).map(str)),
    st.one_of(st.just(""), st.integers(START - 10, START + 10**8).map(str)),
    st.sampled_from(["", "team-a"]), st.sampled_from(["", "7"]),
    st.sampled_from([("v", "plain"), ("", "")]),
).map(lambda t: "\t".join(["L1", t[0], t[1], *t[2], "v", t[3], t[4], t[5], str(START), *t[6:9],
                           *t[9:13], t[13], t[14], *t[15]]))


def received(lines: list[str]) -> tuple[list[dict[str, Any]], str]:
    """What the service writes for a batch of lines (and its metrics' exposition)."""
    rt = Runtime.build(CFG)
    out, err = io.StringIO(), sys.stderr
    sys.stderr = out
    try:
        LaneRecords(DecisionLog(lambda: rt, logging.getLogger("extproc"))).datagram_received(
            "\n".join(lines).encode(), None)
    finally:
        sys.stderr = err
    return [json.loads(x) for x in out.getvalue().splitlines()], \
        generate_latest(metrics.REGISTRY).decode()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_each_line_is_the_reference_record(lines: list[str]) -> None:
    logging.getLogger("extproc").setLevel(logging.INFO)
    written, _ = received(lines)
    rt = Runtime.build(CFG)
    decisions = [w for w in written if w["event"] == "routing.decision"]
    assert len(decisions) == len(lines)
    for line, got in zip(lines, decisions, strict=True):
        want, _ = lane_record(line, rt)
        for head in ("ts", "level", "logger", "pid"):
            got.pop(head)
        assert got == json.loads(json.dumps(want))


def test_junk_is_counted_lost_and_the_rest_written() -> None:
    logging.getLogger("extproc").setLevel(logging.INFO)
    good = "\t".join(["L1", "r1", "/v1/embeddings", "plain", "plain", "plain", "v",
                      "127.0.0.1:8000", "200", "1", str(START), "1.0", "1.0", "2.0", "3", "",
                      "", "", "", "", "v", "plain"])
    before = metrics.LANE_RECORDS_LOST._value.get()
    written, text = received(["junk", "D\t5", good, "L1\tshort", good.replace("200", "2x0")])
    assert [w["request_id"] for w in written] == ["r1"]
    assert metrics.LANE_RECORDS_LOST._value.get() - before == 1 + 5 + 1 + 1
    assert 'outcome="ok"' in text


def test_health_sees_answers_and_failures_in_order() -> None:
    """Answers in a row are told at once; a failure between them still counts (3 failures in
    a row eject the backend, an answer between them does not)."""
    rt = Runtime.build(CFG)
    recv = LaneRecords(DecisionLog(lambda: rt, logging.getLogger("extproc")))

    def line(status: str) -> str:
        return "\t".join(["L1", "r", "/v1/embeddings", "plain", "plain", "plain", "v",
                          "127.0.0.1:8000", status, "1", str(START), "", "1.0", "2.0", "", "",
                          "", "", "", "", "v", "plain"])

    err, sys.stderr = sys.stderr, io.StringIO()
    try:
        recv.datagram_received("\n".join(map(line, ["503", "503", "200", "200", "503"])).encode(),
                               None)
        assert rt.health.backends["v"].failures == 1
        recv.datagram_received("\n".join(map(line, ["503", "503"])).encode(), None)
    finally:
        sys.stderr = err
    assert rt.health.backends["v"].until_state == "ejected"


@pytest.mark.parametrize("amounts", [[0.5], [1, 1, 1, 3, 1e9, 0, -2], [4.0, 16.0, 17.5]])
def test_observe_all_is_observe_each(amounts: list[float]) -> None:
    """prometheus_client has no batch observe: ours must expose exactly what observe does."""
    def exposition(each: bool) -> str:
        registry = CollectorRegistry()
        h = Histogram("h", "h", buckets=(1, 4, 16), registry=registry)
        if each:
            for a in amounts:
                h.observe(a)
        else:
            metrics.observe_all(h, amounts)
        return "\n".join(line for line in generate_latest(registry).decode().splitlines()
                         if "_created" not in line)

    assert exposition(False) == exposition(True)
