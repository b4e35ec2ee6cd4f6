"""The fast lane: plain requests for a model with one candidate serving the public name go
through Envoy alone (the route stage never sees them), with the same response headers,
decision record, metrics and JSON errors; anything the lane is unsure of takes the ext_proc
path, as before."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from extproc.config import load_config
from extproc.core.fast_lane import record_socket
from extproc.lane.build import MODULE, LaneBuildError, build, check_envoy, choose
from extproc.render.fast_lane import READ_FILTER
from extproc_dev.stack import Stack, envoy_binary, free_port_run

from .conftest import received, reset, stack_config, start_stack, wait_line, write_config

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
       "RU5ErkJggg==")


@pytest.fixture(scope="module", params=["lua", "compiled"])
def fstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Stack]:
    """The same stack with the lane in Lua and compiled (lane/lane.c): every test runs on
    both."""
    cfg = stack_config(
        backends=[{"name": "v", "preset": "vllm", "models": ["plain", "two"]},
                  {"name": "w", "preset": "vllm", "models": ["two"]},
                  {"name": "gone", "preset": "vllm", "models": ["deadend"]},
                  {"name": "stall", "preset": "vllm", "models": ["stuck"], "stream_idle_s": 1}],
        models=[{"name": "renamed", "aliases": ["nick"],
                 "candidates": [{"backend": "v", "model": "plain"}]}],
        envoy={"per_try_timeout_s": 2, "fast_lane_compiled": request.param == "compiled"})
    stack = start_stack(tmp_path_factory.mktemp("fast"), cfg, dead_backends=("gone",))
    try:
        yield stack
    finally:
        stack.stop()


def route_messages(stack: Stack) -> float:
    """ext_proc messages the route stage has handled so far."""
    text = httpx.get(f"http://127.0.0.1:{stack.config.service.metrics_port}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(
        r'llm_extproc_processing_seconds_count\{[^}]*stage="route"[^}]*\} (\S+)', text))


def chat(stack: Stack, body: dict[str, Any], **headers: str) -> tuple[httpx.Response, dict]:
    reset(stack, "v")
    r = httpx.post(stack.envoy_url + "/v1/chat/completions", headers=headers, timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], **body})
    rec = wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')
    return r, rec


def test_a_plain_request_goes_by_the_fast_lane(fstack: Stack) -> None:
    before = route_messages(fstack)
    r, rec = chat(fstack, {"model": "plain"}, authorization="Bearer client-key",
                  **{"x-envoy-max-retries": "7", "x-extproc-cluster": "llm_backends",
                     "x-envoy-anything": "1", "x-extproc-anything": "1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "v" and r.headers["x-extproc-model"] == "plain"
    assert rec["plan"] == "fast" and rec["outcome"] == "ok" and rec["status"] == 200
    assert rec["attempts"][0]["backend"] == "v" and rec["public_model"] == "plain"
    # Its usage, as the backend said it (read by Envoy: the route stage never sees the answer)
    assert rec["usage"] == {"input_tokens": r.json()["usage"]["prompt_tokens"],
                            "output_tokens": r.json()["usage"]["completion_tokens"]}
    sent = received(fstack, "v")[-1]
    assert sent["json"]["model"] == "plain"
    # What the route stage would have removed never reaches the backend.
    assert not {"authorization", "x-envoy-max-retries", "x-extproc-cluster", "x-envoy-anything",
                "x-extproc-anything"} & set(sent["headers"])
    assert route_messages(fstack) == before  # the route stage never saw it


def test_a_model_served_by_another_name_goes_by_the_lane_renamed(fstack: Stack) -> None:
    """The Lua writes the backend's name into the one model key (the length follows: the
    backend parses the whole body); the client's own text mentioning the name is left alone."""
    before = route_messages(fstack)
    r, rec = chat(fstack, {"model": "renamed", "messages": [
        {"role": "user", "content": 'say "renamed" : "renamed"'}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-model"] == "plain" and rec["plan"] == "fast"
    assert rec["public_model"] == "renamed" and rec["attempts"][0]["model"] == "plain"
    sent = received(fstack, "v")[-1]
    assert sent["json"]["model"] == "plain"
    assert sent["json"]["messages"][0]["content"] == 'say "renamed" : "renamed"'
    assert route_messages(fstack) == before
    # An escaped letter in its value (the decoded name matches, the bytes do not): slow path
    raw = b'{"model": "re\\u006eamed", "messages": [{"role": "user", "content": "hi"}]}'
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and route_messages(fstack) > before


def test_an_alias_goes_by_the_lane_as_its_model(fstack: Stack) -> None:
    """Renamed for the backend like its public model; the record and Envoy's errors name the
    public model, the record the alias the client asked for."""
    before = route_messages(fstack)
    r, rec = chat(fstack, {"model": "nick"})
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-model"] == "plain" and rec["plan"] == "fast"
    assert (rec["model_requested"], rec["public_model"], rec["resolution"]) == \
        ("nick", "renamed", "alias")
    assert received(fstack, "v")[-1]["json"]["model"] == "plain"
    assert route_messages(fstack) == before


def test_the_openai_sdk_streams_by_the_fast_lane_with_usage(fstack: Stack) -> None:
    reset(fstack, "v")
    c = openai.OpenAI(base_url=fstack.envoy_url + "/v1", api_key="x", max_retries=0)
    before = route_messages(fstack)
    stream = c.chat.completions.with_raw_response.create(
        model="plain", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    text = "".join(ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices)
    assert text and stream.headers["x-extproc-backend"] == "v"
    rec = wait_line(fstack, "service", stream.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["usage"]["output_tokens"] == 6
    assert "ttft_ms" in rec["usage"]
    assert route_messages(fstack) == before


def test_a_stream_not_asking_for_usage_has_it_asked_for_by_the_lane(fstack: Stack) -> None:
    """As the route stage would: the backend is asked for the usage chunk (and an uncompressed
    stream), the client never sees that chunk, the record has the usage; renamed too."""
    reset(fstack, "v")
    c = openai.OpenAI(base_url=fstack.envoy_url + "/v1", api_key="x", max_retries=0)
    before = route_messages(fstack)
    stream = c.chat.completions.with_raw_response.create(
        model="renamed", stream=True, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"accept-encoding": "gzip"})
    chunks = list(stream.parse())
    assert chunks and all(ch.choices and ch.usage is None for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks)
    rec = wait_line(fstack, "service", stream.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["usage"]["output_tokens"] == 6
    sent = received(fstack, "v")[-1]
    assert sent["json"]["model"] == "plain" and sent["json"]["stream"] is True
    assert sent["json"]["stream_options"] == {"include_usage": True}
    assert "accept-encoding" not in sent["headers"]
    assert route_messages(fstack) == before


@pytest.mark.parametrize("choice", ["auto", "none", None])
def test_tools_with_a_tool_choice_forcing_nothing_go_by_the_lane(
        fstack: Stack, choice: str | None) -> None:
    before = route_messages(fstack)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}}}]
    r, rec = chat(fstack, {"model": "plain", "tools": tools,
                           **({"tool_choice": choice} if choice else {})})
    assert r.status_code == 200, r.text
    assert rec["plan"] == "fast" and route_messages(fstack) == before
    sent = received(fstack, "v")[-1]["json"]
    assert sent["tools"] == tools and sent.get("tool_choice") == choice


def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.envoy_url, api_key="client-key", max_retries=0,
                               timeout=30)


def test_anthropic_messages_go_by_the_lane_to_a_backend_that_speaks_them(fstack: Stack) -> None:
    """As the route stage passes them natively: only the model renamed; usage recorded; an
    agent's turn (cached system blocks, extended thinking, tool use and results, tool_choice
    auto, a user id) too."""
    reset(fstack, "v")
    before = route_messages(fstack)
    tools = [{"name": "f", "input_schema": {"type": "object", "properties": {
        "n": {"type": "integer"}}}}]
    body: dict[str, Any] = {
        "model": "renamed", "max_tokens": 64, "tools": tools, "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "user_abc_account_1_session_2"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "call f"},
                     {"role": "assistant", "content": [
                         {"type": "thinking", "thinking": "f it is", "signature": "sig"},
                         {"type": "tool_use", "id": "t1", "name": "f", "input": {"n": 1}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "t1", "content": "2"}]}]}
    r = claude(fstack).messages.with_raw_response.create(**body)
    msg = r.parse()
    assert msg.type == "message" and r.headers["x-extproc-model"] == "plain"
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["api"] == "messages"
    assert rec["usage"]["output_tokens"] == msg.usage.output_tokens
    sent = received(fstack, "v")[-1]
    assert sent["path"] == "/v1/messages" and sent["json"] == {**body, "model": "plain"}
    assert "x-api-key" not in sent["headers"]
    with claude(fstack).messages.stream(model="plain", max_tokens=64, messages=[
            {"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens
    assert route_messages(fstack) == before


def test_a_forced_anthropic_tool_call_takes_the_ext_proc_path(fstack: Stack) -> None:
    before = route_messages(fstack)
    r = claude(fstack).messages.with_raw_response.create(
        model="plain", max_tokens=64, tool_choice={"type": "any"}, messages=[
            {"role": "user", "content": "call f"}], tools=[{"name": "f", "input_schema": {
                "type": "object"}}])
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] != "fast" and route_messages(fstack) > before


def test_openai_responses_go_by_the_lane_to_a_backend_that_speaks_them(fstack: Stack) -> None:
    """Passed natively with only the model renamed, as the route stage does: input_text parts
    (Responses' own; on chat they are converted for vLLM, so the slow way), function calls
    and their outputs, a stream (its usage comes in response.completed)."""
    reset(fstack, "v")
    before = route_messages(fstack)
    c = openai.OpenAI(base_url=fstack.envoy_url + "/v1", api_key="x", max_retries=0)
    body: dict[str, Any] = {
        "model": "renamed", "instructions": "be brief", "tool_choice": "auto", "store": False,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "call f"}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "2"}]}
    r = c.responses.with_raw_response.create(**body)
    assert r.parse().output_text and r.headers["x-extproc-model"] == "plain"
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["api"] == "responses"
    assert rec["usage"]["output_tokens"] == r.parse().usage.output_tokens
    sent = received(fstack, "v")[-1]
    assert sent["path"] == "/v1/responses" and sent["json"] == {**body, "model": "plain"}
    with c.responses.with_streaming_response.create(model="plain", input="hi",
                                                    stream=True) as s:
        text = s.read().decode()
        rid = s.headers["x-request-id"]
    assert "response.completed" in text
    rec = wait_line(fstack, "service", rid, '"routing.decision"')
    assert rec["plan"] == "fast" and rec["usage"]["output_tokens"]
    assert route_messages(fstack) == before
    # An image part: the slow way (fetch policy, vision)
    r = c.responses.with_raw_response.create(model="plain", input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]}])
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] != "fast" and route_messages(fstack) > before


def test_embeddings_go_by_the_fast_lane(fstack: Stack) -> None:
    r = httpx.post(fstack.envoy_url + "/v1/embeddings", timeout=30,
                   json={"model": "plain", "input": "hello"})
    assert r.status_code == 200, r.text
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["api"] == "embeddings"


@pytest.mark.parametrize("body,headers,why", [
    ({"model": "plain", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]},
     {}, "an image part"),
    ({"model": "plain", "messages": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}]}, {}, "a part vLLM refuses as it is"),
    ({"model": "plain", "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]}, {}, "a forced tool call"),
    ({"model": "plain", "tool_choice": {"type": "function", "function": {"name": "f"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, {}, "a named tool call"),
    ({"model": "plain", "response_format": {"type": "json_object"}}, {}, "structured output"),
    # (types the lane takes: only its marks tell these apart)
    ({"model": "plain", "response_format": {"type": "text"}}, {}, "an output format"),
    ({"model": "plain", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see", "image_url": {"url": "http://x"}}]}]}, {},
     "an image beside a text part"),
    ({"model": "plain", "metadata": {"route_intent": "x"}}, {}, "metadata (hints)"),
    ({"model": "plain", "metadata": {"user_id": "u", "route_intent": "x"}}, {},
     "a hint beside the user id"),
    ({"model": "plain", "metadata": {"user_id": "u" * 513}}, {}, "a user id over the limit"),
    ({"model": "plain"}, {"x-route-intent": "x"}, "a hint header"),
    ({"model": "two"}, {}, "two candidates"),
    ({"model": "plain", "stream": True, "stream_options": {"include_usage": False}}, {},
     "a stream with options the gateway merges its own into"),
])
def test_what_the_lane_is_unsure_of_takes_the_ext_proc_path(
        fstack: Stack, body: dict, headers: dict, why: str) -> None:
    before = route_messages(fstack)
    _, rec = chat(fstack, body, **headers)
    assert rec["plan"] != "fast", why
    assert route_messages(fstack) > before, why


@pytest.mark.parametrize("choices", [(b"auto", b"required"), (b"required", b"auto")])
def test_a_second_tool_choice_key_takes_the_ext_proc_path(
        fstack: Stack, choices: tuple[bytes, bytes]) -> None:
    """Envoy's parser and the backend's may read different ones of two keys: the service
    decides."""
    before = route_messages(fstack)
    raw = (b'{"model": "plain", "tool_choice": "%s", "tool_choice": "%s", "tools": '
           b'[{"type": "function", "function": {"name": "f"}}], "messages": '
           b'[{"role": "user", "content": "hi"}]}' % choices)
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] != "fast" and route_messages(fstack) > before


def test_a_malformed_body_gets_our_json_400(fstack: Stack) -> None:
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", timeout=30,
                   headers={"content-type": "application/json"},
                   content=b'{"model": "plain", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_dead_backend_gets_envoys_json_error_and_a_record(fstack: Stack) -> None:
    t0 = time.monotonic()
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": "deadend", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and time.monotonic() - t0 < 5
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and err["model"] == "deadend"
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast" and rec["status"] == 503  # (as the route stage would log it)
    assert rec["outcome"] == "backend_error"
    # In Anthropic's envelope for an Anthropic client
    with pytest.raises(anthropic.APIStatusError) as exc:
        claude(fstack).messages.create(model="deadend", max_tokens=8, messages=[
            {"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503 and exc.value.body["type"] == "error"
    assert "deadend" in exc.value.body["error"]["message"]
    rec = wait_line(fstack, "service", exc.value.response.headers["x-request-id"],
                    '"routing.decision"')
    assert rec["plan"] == "fast" and rec["api"] == "messages"


def test_off_when_the_config_says_so(tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["plain"]}],
                       models=[], envoy={"fast_lane": False})
    stack = start_stack(tmp_path_factory.mktemp("slow"), cfg)
    try:
        r, rec = chat(stack, {"model": "plain"})
        assert r.status_code == 200 and rec["plan"] == "direct"
    finally:
        stack.stop()


def test_a_stalled_backend_is_given_up_on_time_with_a_json_error(fstack: Stack) -> None:
    """The lane's routes carry the ordinary limits: a whole answer that never comes is a JSON
    504 after envoy.per_try_timeout_s; a stream gone silent ends after its silence limit."""
    reset(fstack, "stall")
    behaviour = fstack.backend_url("stall") + "/_emulator/behaviour"
    httpx.post(behaviour, json={"stall": True})
    t0 = time.monotonic()
    r = httpx.post(fstack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": "stuck", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 504 and 1.5 < time.monotonic() - t0 < 6
    assert r.json()["error"]["model"] == "stuck"
    rec = wait_line(fstack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "fast"
    httpx.post(behaviour, json={"stall_after_headers": True})
    t0 = time.monotonic()
    with httpx.stream("POST", fstack.envoy_url + "/v1/chat/completions", timeout=30, json={
            "model": "stuck", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}) as s:
        try:
            for _ in s.iter_bytes():
                pass
        except httpx.HTTPError:
            pass  # (the stream is cut: an incomplete read)
    assert time.monotonic() - t0 < 6
    httpx.post(behaviour, json={})


def decisions(stack: Stack, count: int, wait_s: float) -> list[dict[str, Any]]:
    """The service's decision lines, once there are ``count`` of them or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [orjson.loads(x) for x in stack.log_path("service").read_text().splitlines()
                 if '"routing.decision"' in x]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_compiled_lane_records_with_workers_on_both_sides(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two Envoy workers send to two service workers (a socket each): every fast request has
    its one decision line and is counted once in the summed metrics; none lost. (``auto``:
    the supervisor passes on what `extproc up` settled.)"""
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["plain"]}],
                       models=[], service={"workers": 2, "port": free_port_run(2)},
                       envoy={"fast_lane_compiled": "auto"})
    stack = start_stack(tmp_path_factory.mktemp("workers"), cfg, envoy_workers=2)
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: httpx.post(
                stack.envoy_url + "/v1/chat/completions", timeout=30,
                json={"model": "plain", "stream": i % 3 == 0,
                      "messages": [{"role": "user", "content": "hi"}]}).headers["x-request-id"],
                range(60)))
        lines = decisions(stack, len(ids), 5)
        assert sorted(x["request_id"] for x in lines) == sorted(ids)
        assert {x["plan"] for x in lines} == {"fast"} and len({x["pid"] for x in lines}) == 2
        text = httpx.get(f"http://127.0.0.1:{cfg['service']['metrics_port']}/metrics").text
        counted = sum(float(m.group(1)) for m in re.finditer(
            r'llm_extproc_requests_total\{[^}]*\} (\S+)', text))
        assert counted == len(ids)
        assert "llm_extproc_lane_records_lost_total 0.0" in text
    finally:
        stack.stop()


def test_the_module_is_built_once_per_source_and_only_for_envoy_1_40(tmp_path) -> None:
    """`extproc lane-module` builds lane.c into the cache (by its hash) and prints the
    directory; a second call finds it built; an Envoy of another version is refused."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    run = [sys.executable, "-m", "extproc.cli", "lane-module"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    lib = Path(first.strip()) / f"lib{MODULE}.so"
    assert lib.exists() and str(tmp_path) in first
    built = lib.stat().st_mtime_ns
    assert subprocess.run(run, env=env, capture_output=True, text=True).stdout == first
    assert lib.stat().st_mtime_ns == built
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho 'envoy  version: abc/1.39.2/Clean/RELEASE/BoringSSL'\n")
    fake.chmod(0o755)
    with pytest.raises(LaneBuildError, match=r"written for Envoy 1\.40; .* is 1\.39"):
        check_envoy(str(fake))
    check_envoy(envoy_binary())


def test_auto_is_compiled_where_it_can_be_and_lua_where_not(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """envoy.fast_lane_compiled: auto (the default) runs the compiled lane where `extproc up`
    can build it for its Envoy; with no C compiler (and nothing built yet) the Lua lane, saying
    why. Either way a plain request goes by the lane with its decision record."""
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["plain"]}],
                       models=[], envoy={"fast_lane_compiled": "auto"})
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    for lane in ("compiled", "lua"):
        if lane == "lua":
            monkeypatch.setenv("CC", "/nonexistent/cc")
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        tmp = tmp_path_factory.mktemp(lane)
        stack = start_stack(tmp, cfg)
        try:
            r = httpx.post(stack.envoy_url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            rec = wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')
            assert rec["plan"] == "fast"
            rendered = (tmp / "envoy.yaml").read_text()
            sock = Path(record_socket(stack.config, 0))
            if lane == "compiled":
                assert stack.lane.startswith("fast lane: compiled"), stack.lane
                assert MODULE in rendered and READ_FILTER not in rendered
                assert sock.is_socket()  # (the service receives the module's records)
            else:
                assert stack.lane == ("fast lane: Lua, not compiled: envoy.fast_lane_compiled "
                                      "needs a C compiler (cc): apt-get install gcc, or set CC")
                assert MODULE not in rendered and READ_FILTER in rendered
                assert not sock.exists()
        finally:
            stack.stop()
    # Asked for outright, it is that or nothing; an Envoy of another version gets Lua.
    settled = load_config(write_config(tmp_path_factory.mktemp("asked"), cfg))
    with pytest.raises(LaneBuildError, match="needs a C compiler"):
        choose(settled.model_copy(update={"envoy": settled.envoy.model_copy(
            update={"fast_lane_compiled": True})}), envoy_binary())
    fake = tmp_path_factory.mktemp("fake") / "envoy"
    fake.write_text("#!/bin/sh\necho 'envoy  version: abc/1.41.0/Clean/RELEASE/BoringSSL'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CC")
    got, env, said = choose(settled, str(fake))
    assert got.envoy.fast_lane_compiled is False and env == {}
    assert said.startswith("fast lane: Lua, not compiled: envoy.fast_lane_compiled is written "
                           "for Envoy 1.40;"), said
    # A cache it cannot write (here a file where its directory would be): Lua, saying so.
    blocked = tmp_path_factory.mktemp("blocked") / "cache"
    blocked.write_text("")
    got, env, said = choose(settled, envoy_binary(), cache=blocked)
    assert got.envoy.fast_lane_compiled is False and env == {}
    assert said.startswith("fast lane: Lua, not compiled: building lane.c in "), said


def test_auto_takes_the_lua_lane_when_envoy_will_not_load_the_module(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module Envoy cannot load (here the cached library overwritten with garbage): under
    ``auto`` Envoy and the service are started again with the Lua lane, and the banner says
    why; asked for outright (true), the stack does not start."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    (build(cache / "llm-extproc" / "lane") / f"lib{MODULE}.so").write_bytes(b"not a library")
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["plain"]}],
                       models=[], envoy={"fast_lane_compiled": "auto"})
    tmp = tmp_path_factory.mktemp("garbage")
    stack = start_stack(tmp, cfg)
    try:
        assert stack.lane.startswith("fast lane: Lua, not compiled: Envoy would not start "
                                     "with it: "), stack.lane
        assert READ_FILTER in (tmp / "envoy.yaml").read_text()
        r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
            "model": "plain", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        rec = wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')
        assert rec["plan"] == "fast"
        assert sorted(stack.procs) == ["emulator-v", "envoy", "service"]
    finally:
        stack.stop()
    cfg["envoy"]["fast_lane_compiled"] = True
    with pytest.raises(RuntimeError, match="envoy exited"):
        start_stack(tmp_path_factory.mktemp("insisted"), cfg)


def test_compiled_lane_records_wait_out_a_paused_service(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A service too busy to read for a while (here stopped outright) loses no record: a Unix
    datagram socket queues only net.unix.max_dgram_qlen batches (10 here), and the lane keeps
    what the socket cannot take yet and sends it when it can."""
    cfg = stack_config(backends=[{"name": "v", "preset": "vllm", "models": ["plain"]}],
                       models=[], envoy={"fast_lane_compiled": True})
    stack = start_stack(tmp_path_factory.mktemp("paused"), cfg)
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    try:
        first = httpx.post(stack.envoy_url + "/v1/chat/completions", json=body, timeout=30)
        pid = wait_line(stack, "service", first.headers["x-request-id"],
                        '"routing.decision"')["pid"]
        ids = [first.headers["x-request-id"]]
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(60):  # (spread over more flushes than the socket's queue holds)
                ids.append(httpx.post(stack.envoy_url + "/v1/chat/completions", json=body,
                                      timeout=30).headers["x-request-id"])
                time.sleep(0.03)
        finally:
            os.kill(pid, signal.SIGCONT)
        lines = decisions(stack, len(ids), 10)
        text = httpx.get(f"http://127.0.0.1:{cfg['service']['metrics_port']}/metrics").text
        assert "llm_extproc_lane_records_lost_total 0.0" in text
        assert sorted(x["request_id"] for x in lines) == sorted(ids)
    finally:
        stack.stop()
