"""service.observe_responses: false: one gRPC message fewer per request. Clients still see where
requests went (Envoy's route adds the headers); the outcome is in Envoy's access log."""

from __future__ import annotations

import time

import httpx
import orjson

from .conftest import stack_config, start_stack


def test_fast_mode_keeps_response_headers_and_logs_outcome_in_access_log(tmp_path) -> None:
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1", "shared"]},
                  {"name": "b", "preset": "llamacpp", "models": ["shared-q"]}],
        models=[{"name": "solo", "candidates": [{"backend": "a", "model": "m1"}]},
                {"name": "two", "candidates": [{"backend": "a", "model": "shared"},
                                               {"backend": "b", "model": "shared-q"}]}],
        service={"observe_responses": False})
    stack = start_stack(tmp_path, cfg)
    try:
        def chat(model: str) -> httpx.Response:
            return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]})

        direct, per_attempt = chat("solo"), chat("two")
        assert (direct.headers["x-extproc-backend"], direct.headers["x-extproc-model"]) == \
            ("a", "m1")
        assert (per_attempt.headers["x-extproc-backend"],
                per_attempt.headers["x-extproc-model"]) == ("a", "shared")
        assert direct.headers["x-extproc-attempts"] == "1"
        rid = direct.headers["x-request-id"]
        deadline, access, record = time.monotonic() + 5, None, None
        while (access is None or record is None) and time.monotonic() < deadline:
            time.sleep(0.1)
            for line in stack.log_path("envoy").read_text().splitlines():
                if rid in line and '"envoy.access"' in line:
                    access = orjson.loads(line)
            for line in stack.log_path("service").read_text().splitlines():
                if rid in line and '"routing.decision"' in line:
                    record = orjson.loads(line)
        assert access is not None and record is not None
        assert access["status"] == 200 and access["backend"] == "a"
        assert record["outcome"] == "routed" and record["public_model"] == "solo"
    finally:
        stack.stop()
