"""Decision records come back from Envoy's gRPC access log with the outcome: one line per
request, written by the service, for requests routed directly, per attempt, and answered by the
route stage itself; no gRPC message per request is spent on it."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from extproc_dev.stack import Stack

from .conftest import stack_config, start_stack


def records(stack: Stack, rids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 5  # Envoy flushes its access log batches every 0.25 s
    while len(found) < len(rids) and time.monotonic() < deadline:
        time.sleep(0.1)
        for line in stack.log_path("service").read_text().splitlines():
            if '"routing.decision"' in line:
                rec = orjson.loads(line)
                if rec["request_id"] in rids:
                    assert rec["request_id"] not in found or found[rec["request_id"]] == rec, \
                        "one record per request"
                    found[rec["request_id"]] = rec
    return found


def test_records_carry_the_outcome(tmp_path) -> None:
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1", "shared"]},
                  {"name": "b", "preset": "llamacpp", "models": ["shared-q"]}],
        models=[{"name": "solo", "candidates": [{"backend": "a", "model": "m1"}]},
                {"name": "two", "candidates": [{"backend": "a", "model": "shared"},
                                               {"backend": "b", "model": "shared-q"}]}],
        envoy={"fast_lane": False})  # (the route stage's plans; the lane's: test_fast_lane)
    stack = start_stack(tmp_path, cfg)
    try:
        def chat(model: str) -> httpx.Response:
            return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]})

        direct, per_attempt, unknown = chat("solo"), chat("two"), chat("nope")
        listing = httpx.get(stack.envoy_url + "/v1/models")
        assert (direct.headers["x-extproc-backend"], direct.headers["x-extproc-model"]) == \
            ("a", "m1")
        assert (per_attempt.headers["x-extproc-backend"],
                per_attempt.headers["x-extproc-model"]) == ("a", "shared")
        assert unknown.status_code == 404 and listing.status_code == 200
        rids = [r.headers["x-request-id"] for r in (direct, per_attempt, unknown, listing)]
        got = records(stack, rids)
        assert set(got) == set(rids)
        d, p, u, g = (got[r] for r in rids)
        for rec, backend, model in ((d, "a", "m1"), (p, "a", "shared")):
            assert rec["outcome"] == "ok" and rec["status"] == 200
            assert [(x["backend"], x["model"], x["status"]) for x in rec["attempts"]] == \
                [(backend, model, 200)]
            assert rec["timings_ms"]["total"] >= rec["timings_ms"]["to_first_backend_byte"] > 0
        assert [c["backend"] for c in p["candidates"]] == ["a", "b"]
        assert (d["plan"], p["plan"]) == ("direct", "per_attempt")
        assert (u["outcome"], u["status"], u["error_code"]) == ("rejected", 404,
                                                                "model_not_found")
        assert (g["outcome"], g["status"], g["path"]) == ("answered", 200, "/v1/models")
        pids = {orjson.loads(x)["pid"] for x in stack.log_path("service").read_text()
                .splitlines() if '"service.started"' in x}
        assert {r["decided_by"] for r in got.values()} <= pids
    finally:
        stack.stop()
