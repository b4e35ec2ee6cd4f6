"""Backends that die, stall, refuse or answer badly, through a real Envoy (issue 16). Every load
reports sent, answered and lost; lost is always 0."""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Iterator

import httpx
import pytest

from extproc_dev.stack import Stack

from .conftest import received, reset, stack_config, start_stack, wait_line

BODY = {"messages": [{"role": "user", "content": "hi"}]}


class Blackhole:
    """A listener whose accept queue is full: the kernel drops new SYNs, so connections hang
    as they do to a host that was switched off."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", self.port))
            self.fillers.append(c)

    def close(self) -> None:
        for c in [*self.fillers, self.sock]:
            c.close()


@pytest.fixture(scope="module")
def hole() -> Iterator[Blackhole]:
    h = Blackhole()
    yield h
    h.close()


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory, hole: Blackhole) -> Iterator[Stack]:
    m = ["m"]
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": m},
                  {"name": "b", "preset": "vllm", "models": m},
                  {"name": "dead", "preset": "vllm", "models": m},
                  {"name": "hole", "preset": "vllm", "models": m,
                   "url": f"http://127.0.0.1:{hole.port}/v1"},
                  {"name": "stuck", "preset": "vllm", "models": m},
                  {"name": "mute", "preset": "vllm", "models": m},
                  {"name": "limited", "preset": "vllm", "models": m},
                  {"name": "bad", "preset": "vllm", "models": m}],
        models=[{"name": "only-a", "candidates": [{"backend": "a", "model": "m"}]},
                {"name": "dead-first", "candidates": [{"backend": "dead", "model": "m"},
                                                      {"backend": "a", "model": "m"}]},
                {"name": "hole-first", "candidates": [{"backend": "hole", "model": "m"},
                                                      {"backend": "a", "model": "m"}]},
                {"name": "stuck-first", "candidates": [{"backend": "stuck", "model": "m"},
                                                       {"backend": "a", "model": "m"}]},
                {"name": "mute-first", "fallback_on": ["stream_without_content"],
                 "candidates": [{"backend": "mute", "model": "m"},
                                {"backend": "a", "model": "m"}]},
                {"name": "mute-plain", "candidates": [{"backend": "mute", "model": "m"},
                                                      {"backend": "a", "model": "m"}]},
                {"name": "limited-first", "candidates": [{"backend": "limited", "model": "m"},
                                                         {"backend": "a", "model": "m"}]},
                {"name": "fallback", "fallback_on": ["empty_answer", "no_choices",
                                                     "content_filter", "invalid_tool_arguments",
                                                     "stream_without_content"],
                 "candidates": [{"backend": "bad", "model": "m"},
                                {"backend": "b", "model": "m"}]},
                {"name": "no-fallback", "candidates": [{"backend": "bad", "model": "m"},
                                                       {"backend": "b", "model": "m"}]},
                {"name": "replicas", "candidates": [{"backend": "a", "model": "m", "tier": 0},
                                                    {"backend": "b", "model": "m", "tier": 0}]},
                {"name": "replicas-dead", "candidates": [
                    {"backend": "b", "model": "m", "tier": 0},
                    {"backend": "dead", "model": "m", "tier": 0}]}],
        expose_backend_models=False,
        health={"interval_s": 0.3, "timeout_s": 0.5, "unhealthy_threshold": 2,
                "ejection_s": 30},
        # (fast_lane off: only-a is the ext_proc path's yardstick for failover)
        envoy={"connect_timeout_s": 1, "per_try_timeout_s": 2, "route_timeout_s": 4,
               "stream_idle_s": 1.5, "fast_lane": False})
    stack = start_stack(tmp_path_factory.mktemp("health"), cfg, dead_backends=("dead", "hole"))
    yield stack
    stack.stop()


CLIENT = httpx.Client(timeout=15)  # one connection pool: latencies are Envoy's and ours


def chat(stack: Stack, model: str, timeout: float = 15, **body: object) -> httpx.Response:
    return CLIENT.post(stack.envoy_url + "/v1/chat/completions", timeout=timeout,
                       json={**BODY, "model": model, **body})


def behave(stack: Stack, backend: str, **behaviour: object) -> None:
    httpx.post(stack.backend_url(backend) + "/_emulator/behaviour", json=behaviour)


def health(stack: Stack) -> dict[str, dict]:
    r = httpx.get(stack.envoy_url + "/extproc/health", timeout=5)
    assert r.status_code == 200, r.text
    return {b["backend"]: b for b in r.json()["data"]}


def wait_state(stack: Stack, backend: str, state: str, within: float = 10) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        h = health(stack)[backend]
        if h["state"] == state:
            return h
        time.sleep(0.1)
    raise AssertionError(f"{backend} is not {state} after {within}s: {health(stack)}")


class Count:
    """Requests sent, answered (a 2xx or a JSON error) and lost, with their latencies."""

    def __init__(self) -> None:
        self.sent = self.ok = self.errors = self.lost = 0
        self.latencies: list[float] = []
        self.backends: dict[str, int] = {}

    def one(self, stack: Stack, model: str, **body: object) -> httpx.Response | None:
        self.sent += 1
        t0 = time.monotonic()
        try:
            r = chat(stack, model, **body)
        except httpx.HTTPError:
            self.lost += 1
            return None
        self.latencies.append(time.monotonic() - t0)
        if r.status_code < 300:
            self.ok += 1
            b = r.headers.get("x-extproc-backend", "-")
            self.backends[b] = self.backends.get(b, 0) + 1
        elif r.headers.get("content-type", "").startswith("application/json"):
            self.errors += 1
        else:
            self.lost += 1
        return r

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    def report(self, what: str) -> str:
        line = (f"{what}: sent {self.sent}, answered {self.ok + self.errors} ({self.ok} ok), "
                f"lost {self.lost}, p50 {self.p50 * 1000:.1f} ms, backends {self.backends}")
        print(line)
        return line


def side_by_side(stack: Stack, model: str, n: int = 40) -> tuple[Count, Count]:
    """The model and the same model without its bad candidate, interleaved request by request."""
    with_bad, without = Count(), Count()
    for _ in range(n):
        with_bad.one(stack, model)
        without.one(stack, "only-a")
    with_bad.report(model)
    without.report("only-a (the same without it)")
    return with_bad, without


@pytest.mark.parametrize(("model", "bad"), [("dead-first", "dead"), ("hole-first", "hole")])
def test_a_down_candidate_is_skipped_once_known(hstack: Stack, model: str, bad: str) -> None:
    """Nothing listening, or connections that hang (the host switched off): every request is
    answered meanwhile, and once the probes mark the backend unhealthy, requests no longer pay
    for it: p50 within 1.5x of the same model without that candidate."""
    count = Count()
    count.one(hstack, model)  # before the probes noticed (the blackhole costs its timeout)
    state = wait_state(hstack, bad, "unhealthy")
    assert state["since"] <= time.time() and "health probe failed" in state["reason"]
    with_bad, without = side_by_side(hstack, model)
    assert count.lost == with_bad.lost == without.lost == 0
    assert count.ok == 1 and with_bad.ok == with_bad.sent
    assert with_bad.backends == {"a": with_bad.sent}
    assert with_bad.p50 <= 1.5 * without.p50, (with_bad.p50, without.p50)
    r = chat(hstack, model)
    rec = wait_line(hstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert [(u["backend"], u["state"], u["skipped"]) for u in rec["unavailable"]] == \
        [(bad, "unhealthy", True)]
    assert [a["backend"] for a in rec["attempts"]] == ["a"]


def stream_text(stack: Stack, model: str, timeout: float = 15) -> tuple[int, str, str]:
    """(status, backend, the content the client's stream carried)."""
    import orjson

    with CLIENT.stream("POST", stack.envoy_url + "/v1/chat/completions", timeout=timeout,
                       json={**BODY, "model": model, "stream": True}) as r:
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in orjson.loads(line[6:])["choices"]:
                    text += c["delta"].get("content") or ""
        return r.status_code, r.headers.get("x-extproc-backend", "-"), text


def test_a_stalled_backend_fails_over_then_is_ejected(hstack: Stack) -> None:
    """A backend that takes requests and never answers (its health endpoint still fine, as a
    hung engine's is): a stream moves on after envoy.stream_idle_s, a non-streaming request
    after its attempt limit; after eject_after_failures such attempts it is skipped."""
    behave(hstack, "stuck", stall=True)
    try:
        count, t0 = Count(), time.monotonic()
        status, backend, text = stream_text(hstack, "stuck-first")
        assert (status, backend) == (200, "a") and text.startswith("Hello from a")
        streamed_s = time.monotonic() - t0
        for _ in range(2):
            count.one(hstack, "stuck-first")
        assert count.backends == {"a": 2}
        state = wait_state(hstack, "stuck", "ejected", within=3)
        assert "failed attempts in a row" in state["reason"]
        fast = Count()
        for _ in range(10):
            fast.one(hstack, "stuck-first")
        count.report("stalled first candidate, before ejection")
        fast.report("after ejection")
        assert count.lost == fast.lost == 0 and fast.backends == {"a": 10}
        assert 1.4 < streamed_s < 5 and max(fast.latencies) < 0.5
    finally:
        reset(hstack, "stuck")


def test_a_long_stream_is_bounded_by_silence_not_by_length(hstack: Stack) -> None:
    """A stream that lasts longer than a whole non-streaming request may (4 s here), with
    gaps under its silence limit (1.5 s): it completes."""
    behave(hstack, "a", stream_delay_s=0.7)
    try:
        t0 = time.monotonic()
        status, backend, text = stream_text(hstack, "only-a")
        took = time.monotonic() - t0
    finally:
        reset(hstack, "a")
    assert (status, backend) == (200, "a")
    assert text == "Hello from a serving m.", text
    assert took > 4.0  # longer than envoy.route_timeout_s


def test_a_stream_stalling_after_the_client_got_bytes_ends_never_hangs(hstack: Stack) -> None:
    """Bytes already reached the client, so no other candidate can take over: the stream is
    ended (the client's SDK raises an incomplete-read error) after envoy.stream_idle_s."""
    behave(hstack, "a", stall_after_events=2)
    t0 = time.monotonic()
    try:
        with pytest.raises(httpx.HTTPError):
            stream_text(hstack, "only-a", timeout=20)
    finally:
        reset(hstack, "a")
    assert 1.4 < time.monotonic() - t0 < 3.5


def test_a_stream_that_stalls_before_its_first_byte_moves_on(hstack: Stack) -> None:
    """Headers, then silence. With the stream_without_content rule the attempt stage holds a
    stream's headers until its first content, so the stall is still a retry and the client
    sees only the next candidate's stream. Without it, the client already has the headers:
    the stream ends after envoy.stream_idle_s (never a hang)."""
    behave(hstack, "mute", stall_after_headers=True)
    try:
        count = Count()
        for _ in range(2):
            count.sent += 1
            status, backend, text = stream_text(hstack, "mute-first")
            assert (status, backend) == (200, "a") and text.startswith("Hello from a"), text
            count.ok += 1
        print(f"stream stalling after its headers: sent {count.sent}, answered {count.ok}, "
              f"lost {count.sent - count.ok}")
        assert len(received(hstack, "mute")) == 2
        t0 = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            stream_text(hstack, "mute-plain", timeout=20)
        assert time.monotonic() - t0 < 3.5
    finally:
        reset(hstack, "mute")


def test_a_429_moves_on_now_and_cools_the_backend(hstack: Stack) -> None:
    behave(hstack, "limited", fail_status=429, fail_times=-1, headers={"retry-after": "30"})
    try:
        count = Count()
        first = count.one(hstack, "limited-first")
        assert first is not None and first.headers["x-extproc-attempts"] == "2"
        state = wait_state(hstack, "limited", "cooling", within=2)
        assert state["reason"] == "429, Retry-After 30s" and 25 < state["for_s"] <= 30
        for _ in range(20):
            count.one(hstack, "limited-first")
        count.report("first candidate answering 429 with Retry-After 30")
        assert count.lost == 0 and count.backends == {"a": 21}
        assert len(received(hstack, "limited")) == 1  # cooled down: not asked again
        rec = wait_line(hstack, "service", first.headers["x-request-id"], '"routing.decision"')
        assert rec["capability_retries"][0]["reason"] == "rate_limited: 429, Retry-After 30s"
    finally:
        reset(hstack, "limited")


def test_replicas_in_one_tier_share_the_load(hstack: Stack) -> None:
    count = Count()
    for _ in range(200):
        count.one(hstack, "replicas")
    count.report("two replicas in one tier")
    assert count.lost == 0 and count.ok == 200
    assert 60 <= count.backends.get("a", 0) <= 140 and 60 <= count.backends.get("b", 0) <= 140
    alone = Count()
    for _ in range(200):
        alone.one(hstack, "replicas-dead")
    alone.report("two replicas in one tier, one dead")
    assert alone.lost == 0 and alone.backends == {"b": 200}


def test_a_backend_back_up_is_used_again(hstack: Stack) -> None:
    """'dead' starts listening: the probes bring it back and it is first again."""
    import subprocess
    import sys

    from extproc.config import backend_endpoint
    from extproc_dev.stack import wait_port

    wait_state(hstack, "dead", "unhealthy")
    ep = backend_endpoint(next(b for b in hstack.config.backends if b.name == "dead").url)
    proc = subprocess.Popen([sys.executable, "-m", "extproc_dev.emulators", "--flavour", "vllm",
                             "--name", "dead", "--models", "m", "--port", str(ep.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", ep.port, proc=proc)
        wait_state(hstack, "dead", "healthy")
        r = chat(hstack, "dead-first")
        assert r.status_code == 200 and r.headers["x-extproc-backend"] == "dead"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    wait_state(hstack, "dead", "unhealthy")


# ---------------------------------------------------------------- bad answers

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(("behaviour", "body", "reason"), [
    ({"content": ""}, {}, "empty_answer"),
    ({"no_choices": True}, {}, "no_choices"),
    ({"finish_reason": "content_filter"}, {}, "content_filter"),
    ({"tool_arguments": "{not json"}, {"tools": TOOLS, "tool_choice": "required"},
     "invalid_tool_arguments"),
])
def test_a_bad_answer_moves_to_the_next_candidate(hstack: Stack, behaviour: dict, body: dict,
                                                   reason: str) -> None:
    behave(hstack, "bad", **behaviour)
    try:
        r = chat(hstack, "fallback", **body)
        assert r.status_code == 200 and r.headers["x-extproc-backend"] == "b", r.text
        assert r.headers["x-extproc-attempts"] == "2"
        rec = wait_line(hstack, "service", r.headers["x-request-id"], '"routing.decision"')
        assert rec["capability_retries"][0]["reason"].startswith(reason + ":")
        assert rec["needs"]["fallback_on"]
        # Without the opt-in, the same answer is the answer.
        r = chat(hstack, "no-fallback", **body)
        assert r.status_code == 200 and r.headers["x-extproc-backend"] == "bad"
    finally:
        reset(hstack, "bad")


@pytest.mark.parametrize(("behaviour", "reason"), [
    ({"stream_cut": True}, "stream_without_content"),
    ({"content": "", "finish_reason": "content_filter"}, "content_filter"),
])
def test_a_bad_stream_moves_on_before_the_client_sees_it(hstack: Stack, behaviour: dict,
                                                         reason: str) -> None:
    behave(hstack, "bad", **behaviour)
    try:
        status, backend, text = stream_text(hstack, "fallback")
        assert (status, backend) == (200, "b") and text.startswith("Hello from b")
        status, backend, text = stream_text(hstack, "no-fallback")
        assert (status, backend, text) == (200, "bad", "")
    finally:
        reset(hstack, "bad")


def test_only_what_a_rule_names_is_retried(hstack: Stack) -> None:
    """Tools offered but not forced, and the model answers in prose: that is an answer."""
    r = chat(hstack, "fallback", tools=TOOLS, tool_choice="auto")
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "bad"
    assert r.headers["x-extproc-attempts"] == "1"
    assert r.json()["choices"][0]["message"]["content"].startswith("Hello from bad")
