"""Capability routing and response-body failover through a real Envoy, with emulators that
misbehave on purpose (ignore tools, prose in JSON mode, text streams when tools are forced,
images refused with each backend's real error)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from extproc_dev.stack import Stack

from ..media import data_url, png
from .conftest import received, reset, stack_config, start_stack, wait_line

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
SCHEMA = {"type": "object", "required": ["city", "temp"],
          "properties": {"city": {"type": "string"}, "temp": {"type": "number"}}}
IMAGE = data_url("image/png", png())
ALL = ("good", "lazy", "eye", "llama")


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(
        backends=[
            {"name": "good", "preset": "vllm",
             "models": [{"name": "good-70b", "capabilities": ["tools", "json"]},
                        {"name": "mirror-8b", "capabilities": ["tools"]}]},
            {"name": "lazy", "preset": "vllm",
             "models": [{"name": "lazy-7b", "capabilities": ["tools", "json", "vision"]},
                        {"name": "mirror-8b", "capabilities": ["tools"]}]},
            {"name": "eye", "preset": "vllm",
             "models": [{"name": "eye-vl", "capabilities": ["vision"]}]},
            # Its capabilities stay unknown (not asked): these tests are about declared ones.
            {"name": "llama", "preset": "llamacpp", "models": [{"name": "llama-vl"}],
             "discovery": {"enabled": False}},
        ],
        models=[
            {"name": "agent", "candidates": [{"backend": "lazy", "model": "lazy-7b"},
                                             {"backend": "good", "model": "good-70b"}]},
            {"name": "seer", "candidates": [{"backend": "lazy", "model": "lazy-7b"},
                                            {"backend": "eye", "model": "eye-vl"}]},
            {"name": "seer-llama", "candidates": [{"backend": "llama", "model": "llama-vl"},
                                                  {"backend": "eye", "model": "eye-vl"}]},
            {"name": "viewer", "candidates": [{"backend": "eye", "model": "eye-vl"}]},
            # Two replicas of one model: nothing differs between the attempts.
            {"name": "mirrored", "candidates": [{"backend": "lazy", "model": "mirror-8b"},
                                                {"backend": "good", "model": "mirror-8b"}]},
        ],
        virtual_models=[{"name": "auto"}, {"name": "auto:tools", "requires": ["tools"]},
                        {"name": "auto:vision", "requires": ["vision"]},
                        {"name": "auto:audio", "requires": ["audio"]}],
    )
    stack = start_stack(tmp_path_factory.mktemp("caps"), cfg)
    yield stack
    stack.stop()


@pytest.fixture(autouse=True)
def clean(cstack: Stack) -> None:
    for b in ALL:
        reset(cstack, b)


def quirk(stack: Stack, backend: str, **behaviour: object) -> None:
    httpx.post(stack.backend_url(backend) + "/_emulator/behaviour", json=behaviour)


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="k", max_retries=0, timeout=30)


def weather(stack: Stack, model: str, **kw: object):
    return client(stack).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        **kw)


def test_forced_tools_non_streaming_fails_over_to_capable(cstack: Stack) -> None:
    quirk(cstack, "lazy", ignore_tools=True)
    r = weather(cstack, "agent", tool_choice="required")
    msg = r.parse().choices[0].message
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"
    assert r.headers["x-extproc-backend"] == "good" and r.headers["x-extproc-attempts"] == "2"
    assert "Hello from lazy" not in r.text  # none of the bad attempt's bytes
    assert len(received(cstack, "lazy")) == 1 and len(received(cstack, "good")) == 1


def test_forced_tools_streaming_fails_over_and_client_sees_only_good_events(cstack) -> None:
    quirk(cstack, "lazy", ignore_tools=True, stream_delay_s=0.01)
    stream = client(cstack).chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", stream=True)
    chunks = list(stream)
    names = [tc.function.name for c in chunks for tc in (c.choices[0].delta.tool_calls or [])
             if c.choices and tc.function and tc.function.name]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert names == ["get_weather"]
    assert text == ""  # the lazy model's prose never reached the client
    assert {c.model for c in chunks} == {"good-70b"}
    assert len(received(cstack, "lazy")) == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_replicas_prepared_once_and_judged_on_the_response_side(cstack: Stack,
                                                                streaming: bool) -> None:
    """Candidates serving the same name: the route stage prepares the body once and the
    attempt stage sees only responses (one message fewer per attempt), yet a forced capability
    the first replica does not deliver still moves the request to the next."""
    quirk(cstack, "lazy", ignore_tools=True, stream_delay_s=0.01)
    raw = client(cstack).chat.completions.with_raw_response.create(
        model="mirrored", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=TOOLS, tool_choice="required", stream=streaming)
    if streaming:
        chunks = list(raw.parse())
        names = [tc.function.name for c in chunks for tc in (c.choices[0].delta.tool_calls or [])
                 if c.choices and tc.function and tc.function.name]
    else:
        names = [tc.function.name for tc in raw.parse().choices[0].message.tool_calls or []]
    assert names == ["get_weather"]
    assert raw.headers["x-extproc-backend"] == "good" and raw.headers["x-extproc-attempts"] == "2"
    sent = received(cstack, "lazy") + received(cstack, "good")
    assert [r["json"]["model"] for r in sent] == ["mirror-8b", "mirror-8b"]
    rec = wait_line(cstack, "service", raw.headers["x-request-id"], '"routing.decision"')
    assert rec["plan"] == "judged" and rec["outcome"] == "ok"
    (retry,) = rec["capability_retries"]
    assert retry["backend"] == "lazy" and retry["retried"] is True


def test_streaming_hold_releases_at_the_deciding_event(cstack: Stack) -> None:
    """A forced-tools stream is held exactly until the deciding event: the client's first byte
    comes after the backend wrote the tool-call delta (nothing was let through before it was
    judged) and long before the stream ends (the hold is not a buffer). The emulator notes
    when it wrote each event on the machine's monotonic clock, the one read here."""
    quirk(cstack, "lazy", stream_delay_s=0.3)
    body = {"model": "mirrored", "stream": True, "tools": TOOLS, "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    with httpx.stream("POST", cstack.envoy_url + "/v1/chat/completions", json=body,
                      timeout=30) as r:
        first = time.monotonic()  # the response headers: released together with the events
        events = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "lazy"
    assert "tool_calls" in events[1]
    sent = httpx.get(cstack.backend_url("lazy") + "/_emulator/stream_sent").json()["sent"]
    assert len(sent) >= 3
    assert sent[1] <= first < sent[-1]
    assert first - sent[1] < 0.15, f"released {first - sent[1]:.3f} s after the deciding event"


def test_forced_named_function(cstack: Stack) -> None:
    r = weather(cstack, "agent", tool_choice={"type": "function",
                                              "function": {"name": "get_weather"}})
    assert r.headers["x-extproc-backend"] == "lazy" and r.headers["x-extproc-attempts"] == "1"


def test_tool_choice_auto_with_text_answer_is_not_retried(cstack: Stack) -> None:
    quirk(cstack, "lazy", ignore_tools=True)
    for choice in ("auto", "none"):
        r = weather(cstack, "agent", tool_choice=choice)
        assert r.headers["x-extproc-backend"] == "lazy"
        assert r.headers["x-extproc-attempts"] == "1"
        assert r.parse().choices[0].message.content.startswith("Hello from lazy")
    assert received(cstack, "good") == []


def schema_request(stack: Stack):
    return client(stack).chat.completions.with_raw_response.create(
        model="agent", messages=[{"role": "user", "content": "Weather as JSON"}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})


def test_json_schema_nonconforming_answer_is_retried(cstack: Stack) -> None:
    quirk(cstack, "lazy", bad_schema=True)
    r = schema_request(cstack)
    assert r.headers["x-extproc-backend"] == "good"
    body = orjson.loads(r.parse().choices[0].message.content)
    assert set(body) == {"city", "temp"}


def test_json_schema_conforming_answer_is_not_retried(cstack: Stack) -> None:
    r = schema_request(cstack)
    assert r.headers["x-extproc-backend"] == "lazy" and r.headers["x-extproc-attempts"] == "1"
    assert received(cstack, "good") == []


def test_json_mode_prose_is_retried(cstack: Stack) -> None:
    quirk(cstack, "lazy", prose_json=True)
    r = client(cstack).chat.completions.with_raw_response.create(
        model="agent", messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"})
    assert r.headers["x-extproc-backend"] == "good"
    orjson.loads(r.parse().choices[0].message.content)


def test_all_candidates_failing_gives_last_answer_and_unmet_header(cstack: Stack) -> None:
    quirk(cstack, "lazy", ignore_tools=True)
    quirk(cstack, "good", ignore_tools=True)
    r = weather(cstack, "agent", tool_choice="required")
    assert r.status_code == 200
    assert r.parse().choices[0].message.content == "Hello from good serving good-70b."
    assert r.headers["x-extproc-unmet-capability"].startswith("tools:")
    assert r.headers["x-extproc-attempts"] == "2"


def test_vllm_not_multimodal_error_is_a_capability_gap(cstack: Stack) -> None:
    quirk(cstack, "lazy", reject_images=True)
    r = client(cstack).chat.completions.with_raw_response.create(
        model="seer", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": IMAGE}}]}])
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "eye"
    assert len(received(cstack, "lazy")) == 1


def test_llamacpp_image_error_500_retried(cstack: Stack) -> None:
    quirk(cstack, "llama", reject_images=True)
    r = client(cstack).chat.completions.with_raw_response.create(
        model="seer-llama", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": IMAGE}}]}])
    assert r.headers["x-extproc-backend"] == "eye"


def test_virtual_model_orders_per_request(cstack: Stack) -> None:
    text = client(cstack).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}])
    image = client(cstack).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": IMAGE}}]}])
    assert text.headers["x-extproc-backend"] == "good"  # configured preference order
    assert image.headers["x-extproc-backend"] == "lazy"  # first member that declares vision
    assert text.headers["x-extproc-attempts"] == image.headers["x-extproc-attempts"] == "1"


def test_virtual_models_listed_only_when_backed(cstack: Stack) -> None:
    models = {m.id: m for m in client(cstack).models.list()}
    assert {"auto", "auto:tools", "auto:vision"} <= set(models)
    assert "auto:audio" not in models
    r = httpx.get(cstack.envoy_url + "/v1/models/auto:vision").json()
    assert r["members"] == ["lazy/lazy-7b", "eye/eye-vl"]
    tools = client(cstack).chat.completions.with_raw_response.create(
        model="auto:tools", messages=[{"role": "user", "content": "hi"}])
    assert tools.headers["x-extproc-backend"] in ("good", "lazy")


def test_forced_need_nobody_has_is_400(cstack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        weather(cstack, "viewer", tool_choice="required")
    err = exc.value.body
    assert err["code"] == "unsupported_capability" and err["capability"] == "tools"
    assert err["param"] == "tool_choice"
    assert "agent" in err["models_with_capability"] and "auto:tools" in err["models_with_capability"]
    assert received(cstack, "eye") == []


def test_decision_record_counts_capability_retries(cstack: Stack) -> None:
    quirk(cstack, "lazy", ignore_tools=True)
    r = weather(cstack, "agent", tool_choice="required")
    rec = wait_line(cstack, "service", r.headers["x-request-id"], '"routing.decision"')
    (retry,) = rec["capability_retries"]
    assert retry["backend"] == "lazy" and retry["retried"] is True
    assert retry["reason"] == "tools: forced, but the answer has no tool call"
