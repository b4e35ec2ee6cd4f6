"""`serve --workers 2`: both processes take streams, metrics are summed, SIGTERM stops all."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from extproc_dev.stack import free_port_run

from .conftest import stack_config, start_stack


def test_two_workers_share_the_load(tmp_path) -> None:
    cfg = stack_config(backends=[{"name": "a", "preset": "vllm", "models": ["m1"]}],
                       models=[{"name": "pub", "candidates": [{"backend": "a", "model": "m1"}]}],
                       envoy={"fast_lane": False})  # (the route stage's streams, balanced)
    cfg["service"]["workers"] = 2
    cfg["service"]["port"] = free_port_run(2)  # worker i listens on port + i
    stack = start_stack(tmp_path, cfg)
    try:
        def send(_: int) -> int:
            return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
                "model": "pub", "messages": [{"role": "user", "content": "hi"}]}).status_code

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(send, range(40))) == [200] * 40
        time.sleep(1)  # the access log batches reach the service every 0.25 s
        lines = [orjson.loads(x) for x in stack.log_path("service").read_text().splitlines()
                 if x.startswith("{")]
        started = {x["pid"] for x in lines if x.get("event") == "service.started"}
        decided = {x["decided_by"] for x in lines if x.get("event") == "routing.decision"}
        assert len(started) == 2 and decided == started  # Envoy balanced streams over both
        text = httpx.get(f"http://127.0.0.1:{cfg['service']['metrics_port']}/metrics").text
        total = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                    if x.startswith("llm_extproc_requests_total{"))
        assert total == 40  # summed over the workers by the supervisor
        supervisor = stack.procs["service"]
    finally:
        stack.stop()
    assert supervisor.returncode == 0
