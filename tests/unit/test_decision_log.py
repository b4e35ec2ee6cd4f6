"""The decision log's core without gRPC: an access log entry (as Envoy sends it) plus the
route stage's record in its metadata make the logged record."""

from __future__ import annotations

from types import SimpleNamespace

from envoy.data.accesslog.v3 import accesslog_pb2

from extproc.core.decision import DecisionRecord
from extproc.core.routing import Target
from extproc.shell.decision_log import finish


def runtime(notes: dict) -> SimpleNamespace:
    """What ``finish`` reads of a runtime: the notes and the client header's name."""
    return SimpleNamespace(notes=notes, config=SimpleNamespace(
        hints=SimpleNamespace(client_header="x-client-id")))


def entry(record: DecisionRecord | None, status: int, attempts: int,
          headers: dict[str, str]) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    if record is not None:
        md = e.common_properties.metadata.filter_metadata["extproc"]
        md.fields["record"].string_value = record.to_json()
    e.common_properties.upstream_request_attempt_count = attempts
    e.common_properties.duration.nanos = 12_500_000
    e.common_properties.time_to_first_upstream_rx_byte.nanos = 9_000_000
    e.request.request_id = "rid-1"
    e.response.response_code.value = status
    for k, v in headers.items():
        e.response.response_headers[k] = v
    return e


def routed() -> DecisionRecord:
    return DecisionRecord(request_id="rid-1", method="POST", path="/v1/chat/completions",
                          model_requested="coder", public_model="coder", resolution="alias",
                          candidates=(Target("dead", "m", "127.0.0.1:1"),
                                      Target("live", "m-q4", "127.0.0.1:2")),
                          plan="per_attempt", decided_by=42)


def test_failover_fills_attempts_in_candidate_order() -> None:
    rt = runtime(notes={"rid-1": [{"reason": "tools: forced"}], "other": []})
    rec = finish(entry(routed(), 200, 2, {"x-extproc-backend": "live",
                                          "x-extproc-model": "m-q4",
                                          "x-extproc-converted-parts": "2"}), rt)
    assert rec is not None
    assert rec["event"] == "routing.decision" and rec["outcome"] == "ok"
    assert [(a["n"], a["backend"], a.get("status"), a.get("result")) for a in rec["attempts"]] \
        == [(1, "dead", None, "failed, retried"), (2, "live", 200, None)]
    assert rec["candidates"][1] == {"backend": "live", "model": "m-q4",
                                    "address": "127.0.0.1:2"}
    assert rec["converted_parts"] == 2 and rec["plan"] == "per_attempt"
    assert rec["timings_ms"] == {"to_first_backend_byte": 9.0, "total": 12.5}
    assert rec["capability_retries"] == [{"reason": "tools: forced"}]
    assert "rid-1" not in rt.notes and "other" in rt.notes


def test_no_backend_answered_is_upstream_failed() -> None:
    rec = finish(entry(routed(), 503, 2, {}), runtime(notes={}))
    assert rec is not None and rec["outcome"] == "upstream_failed" and rec["status"] == 503


def test_a_success_no_backend_tagged_is_ok() -> None:
    """Inside Envoy AI Gateway answers carry none of our headers: a 200 is still a 200."""
    rec = finish(entry(routed(), 200, 1, {}), runtime(notes={}))
    assert rec is not None and rec["outcome"] == "ok" and rec["status"] == 200


def test_answers_of_the_route_stage_keep_their_outcome() -> None:
    r = routed()
    r.rejected(404, "model_not_found")
    rec = finish(entry(r, 404, 0, {}), runtime(notes={}))
    assert rec is not None
    assert (rec["outcome"], rec["status"], rec["error_code"], rec["attempts"]) == \
        ("rejected", 404, "model_not_found", [])


def test_requests_never_decided_are_not_records() -> None:
    assert finish(entry(None, 401, 0, {}), runtime(notes={})) is None


def test_usage_and_stream_latency_from_what_envoy_noted() -> None:
    from extproc.contract import Meta
    from extproc.core.decision import usage

    figures = {Meta.USAGE_IN: "12", Meta.USAGE_OUT: "5", Meta.FIRST_TOKEN_US: "1250000",
               Meta.LAST_US: "1650000"}
    assert usage(figures, 1_000_000) == {"input_tokens": 12, "output_tokens": 5,
                                         "ttft_ms": 250.0, "tpot_ms": 100.0}  # 400 ms / 4
    assert usage({Meta.USAGE_IN: "7"}, 1) == {"input_tokens": 7}  # a whole answer: no timings
    assert usage({Meta.FIRST_TOKEN_US: "5"}, 10) == {}  # clocks disagree: no latency
    assert usage({Meta.USAGE_OUT: "x"}) == {}


def test_a_backend_claiming_absurd_usage_loses_the_figure_not_the_record() -> None:
    from extproc.contract import Meta
    from extproc.core.decision import usage

    # (Python refuses to parse a 5000-digit integer: the whole record would be lost.)
    assert usage({Meta.USAGE_OUT: "9" * 5000, Meta.USAGE_IN: "3"}) == {"input_tokens": 3}


async def test_a_large_batch_is_taken_in_slices_with_the_loop_free_between(capsys) -> None:
    """Envoy's access log batches hundreds of entries: taken at once they held up every
    request in flight (~15 ms); in slices, other work runs between them, and none is lost."""
    import asyncio
    import logging

    from envoy.service.accesslog.v3 import als_pb2

    from extproc.config import parse_config
    from extproc.runtime import Runtime
    from extproc.shell.decision_log import DecisionLog

    rt = Runtime.build(parse_config({"backends": [
        {"name": "live", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m-q4"}]},
        {"name": "dead", "url": "http://127.0.0.1:8002/v1", "models": [{"name": "m"}]}]}))
    msg = als_pb2.StreamAccessLogsMessage()
    for i in range(100):
        rec = routed()
        rec.request_id = f"rid-{i}"
        e = entry(rec, 200, 1, {"x-extproc-backend": "live", "x-extproc-model": "m-q4"})
        e.request.request_id = f"rid-{i}"
        msg.http_logs.log_entry.append(e)
    log = logging.getLogger("test.decision_log")
    log.setLevel(logging.INFO)
    answer = DecisionLog(lambda: rt, log).message(msg.SerializeToString())
    assert answer is not None  # a task, not done at once
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    async for _ in answer:
        pass
    ticker.cancel()
    assert ticks >= 100 // 32
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "routing.decision" in ln]
    assert len(lines) == 100 and len({ln.split('"request_id":"')[1][:7] for ln in lines}) == 100
