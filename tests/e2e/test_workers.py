"""`serve --workers 2`: both processes take streams, metrics are summed, SIGTERM stops all."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson

from extproc_dev.stack import free_port_run

from .conftest import stack_config, start_stack


def test_two_workers_share_the_load(tmp_path) -> None:
    assert two_workers(tmp_path) == 0


def test_two_workers_on_unix_sockets(tmp_path) -> None:
    """Envoy reaches each worker by its own socket (path, path.1); the sockets go at stop."""
    path = str(tmp_path / "svc.sock")
    assert two_workers(tmp_path, unix_socket=path) == 0
    assert not Path(path).exists() and not Path(path + ".1").exists()


def two_workers(tmp_path: Path, **service: Any) -> int | None:
    """40 requests through two workers: both decide, metrics summed; the supervisor's exit."""
    cfg = stack_config(backends=[{"name": "a", "preset": "vllm", "models": ["m1"]}],
                       models=[{"name": "pub", "candidates": [{"backend": "a", "model": "m1"}]}],
                       envoy={"fast_lane": False})  # (the route stage's streams, balanced)
    cfg["service"].update(workers=2, port=free_port_run(2), **service)  # worker i: port + i
    stack = start_stack(tmp_path, cfg)
    try:
        if "unix_socket" in service:
            assert Path(service["unix_socket"]).is_socket()
            assert Path(service["unix_socket"] + ".1").is_socket()
            clusters = httpx.get(f"http://127.0.0.1:{cfg['envoy']['admin_port']}/clusters").text
            hosts = {line.split("::")[1] for line in clusters.splitlines()
                     if line.startswith("extproc_service::") and "::cx_total::" in line}
            assert hosts == {service["unix_socket"], service["unix_socket"] + ".1"}  # Envoy's

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
    return supervisor.returncode
