"""Faults through a real Envoy: the service killed or stopped under load, backends refusing,
resetting, failing and stalling. Every test reports requests sent, answered and lost; lost is
always 0 (an answer is a 2xx, or a JSON error, within a bound)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from extproc_dev.stack import Stack, wait_port

from .conftest import reset, stack_config, start_stack, wait_line

BODY = {"messages": [{"role": "user", "content": "hi"}]}


class Load:
    """Sends requests from a few threads for a while; counts what comes back and how."""

    def __init__(self, url: str, model: str, threads: int = 4, timeout: float = 15.0,
                 body: dict | None = None):
        self.url, self.model, self.timeout = url, model, timeout
        self.body = {**(body or BODY), "model": model}
        self.sent = self.ok = self.json_errors = self.lost = 0
        self.statuses: dict[int, int] = {}
        self.slowest = 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _one(self, client: httpx.Client) -> None:
        t0 = time.monotonic()
        with self.lock:
            self.sent += 1
        try:
            r = client.post(self.url + "/v1/chat/completions", json=self.body)
            ok = r.status_code < 300
            is_json = r.headers.get("content-type", "").startswith("application/json") and \
                ("error" in r.json() if not ok else True)
        except (httpx.HTTPError, ValueError):
            ok = is_json = False
            r = None
        with self.lock:
            self.slowest = max(self.slowest, time.monotonic() - t0)
            if r is not None:
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            if ok:
                self.ok += 1
            elif is_json:
                self.json_errors += 1
            else:
                self.lost += 1

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self.stop.is_set():
                self._one(client)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def report(self, what: str) -> str:
        line = (f"{what}: sent {self.sent}, answered {self.ok + self.json_errors} "
                f"({self.ok} ok, {self.json_errors} JSON errors), lost {self.lost}, "
                f"statuses {self.statuses}, slowest {self.slowest:.2f}s")
        print(line)
        return line


@pytest.fixture
def fstack(tmp_path) -> Iterator[Stack]:
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1"]},
                  {"name": "b", "preset": "vllm", "models": ["m1"]},
                  {"name": "gone", "preset": "vllm", "models": ["m1"]}],
        models=[{"name": "pub", "candidates": [{"backend": "a", "model": "m1"},
                                               {"backend": "b", "model": "m1"}]},
                {"name": "dead-first", "candidates": [{"backend": "gone", "model": "m1"},
                                                      {"backend": "b", "model": "m1"}]},
                {"name": "solo", "candidates": [{"backend": "a", "model": "m1"}]}],
        envoy={"per_try_timeout_s": 1.0, "route_timeout_s": 10})
    stack = start_stack(tmp_path, cfg, dead_backends=("gone",))
    yield stack
    stack.stop()


def restart_service(stack: Stack) -> None:
    stack.procs["service"] = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "serve", "--config", stack.config_path],
        stdout=open(stack.log_path("service"), "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env=stack.env, start_new_session=True)
    wait_port("127.0.0.1", stack.config.service.port, proc=stack.procs["service"])


def test_service_killed_under_load_then_recovers(fstack: Stack) -> None:
    with Load(fstack.envoy_url, "pub") as load:
        time.sleep(1.0)
        os.killpg(fstack.procs["service"].pid, signal.SIGKILL)
        fstack.procs["service"].wait()
        time.sleep(1.5)  # new requests meet the dead service
        during = dict(load.statuses)
    load.report("service SIGKILL under load")
    assert load.lost == 0 and load.slowest < 10
    assert during.get(503, 0) > 0  # status_on_error, with a JSON body (counted as answered)
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", json={**BODY, "model": "pub"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "gateway_error"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    assert r.json()["error"]["code"] == "gateway_processing_failed"
    assert "grpc" not in r.text.lower() and "connect" not in r.text.lower()  # no internals
    restart_service(fstack)  # no Envoy restart
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ok = httpx.post(fstack.envoy_url + "/v1/chat/completions",
                        json={**BODY, "model": "pub"})
        if ok.status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("traffic did not recover within 10 s of the restart")
    assert fstack.procs["envoy"].poll() is None
    # Envoy's access log stream reconnects too: decision records resume.
    rec = wait_line(fstack, "service", ok.headers["x-request-id"], '"routing.decision"')
    assert rec["outcome"] == "ok"


def test_sigterm_under_load_completes_in_flight(fstack: Stack) -> None:
    httpx.post(fstack.backend_url("a") + "/_emulator/behaviour", json={"delay_s": 0.5})
    with Load(fstack.envoy_url, "solo", threads=3) as load:
        time.sleep(0.8)  # requests are in flight at the backend
        in_flight_before = load.sent
        fstack.procs["service"].send_signal(signal.SIGTERM)
        fstack.procs["service"].wait(timeout=15)
    load.report("service SIGTERM under load")
    assert load.lost == 0
    assert load.ok >= in_flight_before - 3 > 0  # what was in flight completed
    assert fstack.procs["service"].returncode == 0


@pytest.mark.parametrize(("fault", "behaviour"), [
    ("refusing connections", None),
    ("answering 5xx", {"fail_status": 503, "fail_times": -1}),
    ("resetting mid-response", {"reset": True}),
    ("stalling past the per-try timeout", {"delay_s": 3}),
])
def test_backend_fault_next_candidate_serves(fstack: Stack, fault: str,
                                             behaviour: dict | None) -> None:
    model = "dead-first" if behaviour is None else "pub"
    if behaviour:
        httpx.post(fstack.backend_url("a") + "/_emulator/behaviour", json=behaviour)
    try:
        with Load(fstack.envoy_url, model, threads=2) as load:
            time.sleep(2.0)
    finally:
        reset(fstack, "a")
    load.report(f"first backend {fault}")
    assert load.lost == 0 and load.sent > 0
    assert load.ok == load.sent  # the next candidate served every request


@pytest.mark.parametrize("concurrency", [4, 32])
def test_dead_first_candidate_under_load_every_request_fails_over(fstack: Stack,
                                                                  concurrency: int) -> None:
    """400 requests, the first candidate refusing connections: every one is served by the
    next. Envoy's default circuit breaker (three retries in flight per cluster) refused 20-80%
    of these failovers with a 503 (upstream_rq_retry_overflow)."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def one(_: int) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        try:
            return local.client.post(fstack.envoy_url + "/v1/chat/completions",
                                     json={**BODY, "model": "dead-first"}).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(one, range(400)))
    answered = sum(s != 0 for s in statuses)
    print(f"dead first candidate, concurrency {concurrency}: sent 400, answered {answered}, "
          f"lost {400 - answered}, statuses { {s: statuses.count(s) for s in set(statuses)} }")
    assert statuses == [200] * 400
    stats = httpx.get(f"http://127.0.0.1:{fstack.config.envoy.admin_port}/stats",
                      params={"filter": "retry_overflow"}).text
    assert all(line.endswith(": 0") for line in stats.splitlines() if line), stats


@pytest.mark.parametrize(("fault", "behaviour", "status"), [
    ("answering 5xx", {"fail_status": 500, "fail_times": -1}, 500),
    ("resetting mid-response", {"reset": True}, 502),
    ("stalling", {"delay_s": 3}, 504),
])
def test_no_candidate_left_gives_json_error_naming_model(fstack: Stack, fault: str,
                                                         behaviour: dict, status: int) -> None:
    httpx.post(fstack.backend_url("a") + "/_emulator/behaviour", json=behaviour)
    try:
        r = httpx.post(fstack.envoy_url + "/v1/chat/completions",
                       json={**BODY, "model": "solo"}, timeout=15)
    finally:
        reset(fstack, "a")
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    if status != 500:  # Envoy's own answer names the model; a 500 is the backend's own JSON
        assert err["model"] == "solo" and "solo" in err["message"]


@pytest.mark.parametrize(("fault", "behaviour", "stop"), [
    ("aux vision down", None, True), ("aux vision slow", {"delay_s": 3}, False)])
def test_aux_vision_fault_under_load_policy_holds(tmp_path, fault: str, behaviour: dict | None,
                                                  stop: bool) -> None:
    from ..media import data_url, png
    from .conftest import received

    cfg = stack_config(
        backends=[{"name": "txt", "preset": "llamacpp",
                   "models": [{"name": "coder", "capabilities": ["tools"]}]},
                  {"name": "aux", "preset": "openai",
                   "models": [{"name": "ocr", "capabilities": ["vision"]}]}],
        models=[{"name": "blind", "candidates": [{"backend": "txt", "model": "coder"}]}],
        vision={"backend": "aux", "model": "ocr", "timeout_s": 1, "on_failure": "reject"})
    stack = start_stack(tmp_path, cfg)
    try:
        if stop:
            stack.procs["emulator-aux"].terminate()
            stack.procs["emulator-aux"].wait(timeout=10)
        else:
            httpx.post(stack.backend_url("aux") + "/_emulator/behaviour", json=behaviour)
        image = {"type": "image_url", "image_url": {"url": data_url("image/png", png())}}
        with Load(stack.envoy_url, "blind", threads=2,
                  body={"messages": [{"role": "user", "content": [image]}]}) as load:
            time.sleep(2.5)
        load.report(fault)
        assert load.lost == 0 and load.sent > 0
        assert load.ok == 0 and set(load.statuses) == {503}  # reject: a JSON 503 every time
        assert received(stack, "txt") == []  # nothing, raw or not, reached the blind model
    finally:
        stack.stop()
