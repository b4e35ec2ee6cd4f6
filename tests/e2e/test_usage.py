"""Token usage and latency, as Envoy's response-side Lua reads them: from whole answers, from
streams (the client's include_usage chunk, an event split across chunks), the time to the
first token against a backend that delays it by a known amount; in the decision record and
the OpenTelemetry GenAI metrics, per model, backend and client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc_dev.stack import Stack

from .conftest import received, reset, stack_config, start_stack, wait_line


@pytest.fixture(scope="module")
def ustack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["m"]}],
                       models=[{"name": "chat", "candidates": [{"backend": "v", "model": "m"}]}])
    stack = start_stack(tmp_path_factory.mktemp("usage"), cfg)
    try:
        yield stack
    finally:
        stack.stop()


def ask(stack: Stack, client: str, behaviour: dict[str, Any] | None = None,
        **body: Any) -> dict[str, Any]:
    """One request through Envoy; its decision record."""
    reset(stack, "v")
    if behaviour:
        httpx.post(stack.backend_url("v") + "/_emulator/behaviour", json=behaviour)
    r = httpx.post(stack.envoy_url + "/v1/chat/completions", headers={"x-client-id": client},
                   timeout=30, json={"model": "chat", "messages": [
                       {"role": "user", "content": "hi"}], **body})
    assert r.status_code == 200, r.text
    return wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')


def metric(stack: Stack, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.config.service.metrics_port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_a_whole_answers_usage(ustack: Stack) -> None:
    rec = ask(ustack, "team-a")
    assert rec["usage"] == {"input_tokens": 10, "output_tokens": 8}  # what the emulator says
    assert rec["client"] == "team-a"
    assert metric(ustack, "gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                  client="team-a", backend="v", gen_ai_request_model="chat") >= 10
    assert metric(ustack, "gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                  client="team-a") >= 8


def test_a_streams_usage_chunk_and_latency(ustack: Stack) -> None:
    rec = ask(ustack, "team-b", {"stream_delay_s": 0.02}, stream=True,
              stream_options={"include_usage": True})
    usage = rec["usage"]
    # The emulator counts its six deltas (the role and five words) in its usage chunk.
    assert (usage["input_tokens"], usage["output_tokens"]) == (10, 6)
    assert 0 < usage["ttft_ms"] < 1000 and usage["tpot_ms"] >= 15  # 20 ms between events
    assert metric(ustack, "gen_ai_server_time_to_first_token_count", client="team-b") >= 1
    assert metric(ustack, "gen_ai_server_time_per_output_token_count", client="team-b") >= 1


def test_an_event_split_across_chunks_is_still_read(ustack: Stack) -> None:
    rec = ask(ustack, "team-c", {"split_events": True}, stream=True,
              stream_options={"include_usage": True})
    assert (rec["usage"]["input_tokens"], rec["usage"]["output_tokens"]) == (10, 6)


def test_time_to_first_token_against_a_known_delay(ustack: Stack) -> None:
    rec = ask(ustack, "team-d", {"first_token_delay_s": 0.3}, stream=True)
    assert 300 <= rec["usage"]["ttft_ms"] < 1500


def test_usage_is_asked_for_when_the_client_did_not_and_kept_from_it(ustack: Stack) -> None:
    def events(**body: Any) -> list[str]:
        reset(ustack, "v")
        httpx.post(ustack.backend_url("v") + "/_emulator/behaviour",
                   json={"split_events": True})  # the usage event cut in two, too
        r = httpx.post(ustack.envoy_url + "/v1/chat/completions", timeout=30, json={
            "model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            **body})
        assert r.status_code == 200
        rec = wait_line(ustack, "service", r.headers["x-request-id"], '"routing.decision"')
        assert (rec["usage"]["input_tokens"], rec["usage"]["output_tokens"]) == (10, 6)
        return [line for line in r.text.splitlines() if line.startswith("data: ")]

    plain = events()
    sent = received(ustack, "v")[-1]["json"]
    assert sent["stream_options"] == {"include_usage": True}  # asked of the backend
    assert not any('"usage"' in e for e in plain)  # not shown to a client that did not ask
    assert plain[-1] == "data: [DONE]" and len(plain) == 8  # role, 5 deltas, finish, [DONE]
    asked = events(stream_options={"include_usage": True})
    assert sum('"usage"' in e for e in asked) == 1 and len(asked) == 9  # its own: kept


def test_the_added_usage_event_is_dropped_from_a_crlf_stream_too(ustack: Stack) -> None:
    reset(ustack, "v")
    httpx.post(ustack.backend_url("v") + "/_emulator/behaviour",
               json={"crlf": True, "split_events": True})
    r = httpx.post(ustack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.text.count("\r\n\r\n") == 8  # CRLF as sent
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert not any('"usage"' in e for e in events) and events[-1] == "data: [DONE]"
    rec = wait_line(ustack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["usage"]["output_tokens"] == 6


def test_a_stream_whose_usage_we_ask_for_is_asked_uncompressed(ustack: Stack) -> None:
    reset(ustack, "v")
    httpx.post(ustack.backend_url("v") + "/_emulator/behaviour", json={"gzip": True})
    r = httpx.post(ustack.envoy_url + "/v1/chat/completions", timeout=30,
                   headers={"accept-encoding": "gzip"}, json={
                       "model": "chat", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert "accept-encoding" not in received(ustack, "v")[-1]["headers"]
    assert not any('"usage"' in line for line in r.text.splitlines())
    rec = wait_line(ustack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["usage"]["output_tokens"] == 6
