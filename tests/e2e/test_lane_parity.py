"""The compiled lane decides as the Lua lane does: generated bodies, plain and hostile, sent
through two stacks alike but for ``envoy.fast_lane_compiled``; each takes the fast lane in
both or in neither, the backend gets the same bytes, the client the same status, and Envoy
stays up. (HYPOTHESIS_EXAMPLES scales the number of bodies, as in the property tests.)"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc_dev.stack import Stack

from .conftest import stack_config, start_stack

EXAMPLES = max(60, int(os.environ.get("HYPOTHESIS_EXAMPLES", "700")) // 6)
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
         "/v1/responses")


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    out: dict[str, Stack] = {}
    try:
        for lane in ("lua", "compiled"):
            cfg = stack_config(
                backends=[{"name": "v", "preset": "vllm", "models": ["plain", "two"]},
                          {"name": "w", "preset": "vllm", "models": ["two"]},
                          {"name": "oa", "preset": "openai", "models": ["gpt-x"]}],
                models=[{"name": "renamed", "aliases": ["nick"],
                         "candidates": [{"backend": "v", "model": "plain"}]}],
                envoy={"fast_lane_compiled": lane == "compiled"})
            out[lane] = start_stack(tmp_path_factory.mktemp(lane), cfg)
        yield out
    finally:
        for s in out.values():
            s.stop()


def route_messages(stack: Stack) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.config.service.metrics_port}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(
        r'llm_extproc_processing_seconds_count\{[^}]*stage="route"[^}]*\} (\S+)', text))


def last_sent(stack: Stack, backend: str) -> str | None:
    r = httpx.get(stack.backend_url(backend) + "/_emulator/requests", timeout=5)
    posts = [x for x in r.json()["requests"] if x["method"] == "POST"]
    return posts[-1].get("raw") if posts else None


def outcome(stack: Stack, path: str, body: bytes) -> tuple[int, bool, dict[str, str | None]]:
    """The status, whether the route stage never saw it (the fast lane), and what each
    backend got last."""
    for b in ("v", "oa"):
        httpx.post(stack.backend_url(b) + "/_emulator/reset", timeout=5)
    before = route_messages(stack)
    r = httpx.post(stack.envoy_url + path, content=body, timeout=30,
                   headers={"content-type": "application/json"})
    return r.status_code, route_messages(stack) == before, \
        {b: last_sent(stack, b) for b in ("v", "oa")}


# Bodies: the keys the lane reads, in every shape it must tell apart.
MODELS = st.sampled_from(["plain", "renamed", "nick", "two", "gpt-x", "Plain", "none", 5, None])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
PART_TYPES = st.sampled_from(["text", "image_url", "input_text", "input_audio", "tool_result",
                              "thinking", "function", "weird", "file"])
# (a key the lane refuses on sight, beside a type it takes: only the marks tell)
MARKED = st.sampled_from([None, "url", "image_url", "document", "file_id", "urls"])
PART = st.builds(lambda t, x, k: {"type": t, "text": x, **({k: "u"} if k else {})},
                 PART_TYPES, TEXT, MARKED)
CONTENT = st.one_of(TEXT, st.lists(PART, max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                  "content": CONTENT})
OPTIONAL = {
    "stream": st.sampled_from([True, False, "true", None]),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": False}, {},
                                       "x"]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "auto"},
                                    {"type": "any"}, {"type": "function", "name": "f"}]),
    "tools": st.just([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string"}}}}}]),
    "metadata": st.sampled_from([{"user_id": "u"}, {"user_id": "u" * 600}, {"route": "x"},
                                 {"user_id": "u", "x": 1}, {"user_id": 5}, []]),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
    "input": st.one_of(TEXT, st.lists(MESSAGE, max_size=2)),
    "max_tokens": st.integers(-3, 10**20),
    "temperature": st.floats(allow_nan=False, allow_infinity=False),
}
DOC = st.fixed_dictionaries(
    {"model": MODELS, "messages": st.lists(MESSAGE, max_size=3)},
    optional=OPTIONAL)


MAX_DEPTH = 64  # (lane.c: JSON nested deeper takes the ext_proc path; the Lua has no bound)


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    """Some bodies changed as a hostile client would: spaces where JSON allows them, a key
    twice (or in another case, or escaped), cut short, a stray byte, nested deep."""
    kind = data.draw(st.sampled_from(["none", "none", "spaces", "twice", "case", "escape",
                                      "cut", "byte", "deep", "trailing"]))
    if kind == "spaces":
        return raw.replace(b'":', b'" :\n ').replace(b",", b" ,\t")
    if kind == "twice":
        key = data.draw(st.sampled_from([b"model", b"stream", b"tool_choice", b"metadata"]))
        value = data.draw(st.sampled_from([b'"plain"', b"true", b"false", b'"auto"', b'"two"']))
        return b'{"' + key + b'":' + value + b"," + raw[1:]
    if kind == "case":
        return raw.replace(b'"model"', b'"Model"', 1) + b"" if data.draw(st.booleans()) else \
            b'{"MODEL":"two",' + raw[1:]
    if kind == "escape":
        return raw.replace(b'"model"', b'"mod\\u0065l"', 1)
    if kind == "cut":
        return raw[:data.draw(st.integers(1, max(1, len(raw) - 1)))]
    if kind == "byte":
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at:]
    if kind == "deep":
        n = data.draw(st.sampled_from([10, 63, 64, 65, 200]))
        return b'{"x":' + b"[" * n + b"]" * n + b"," + raw[1:]
    if kind == "trailing":
        return raw + data.draw(st.sampled_from([b" ", b"\n", b"x", b"{}", b"\x00"]))
    return raw


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(doc=DOC, path=st.sampled_from(PATHS), data=st.data())
def test_the_compiled_lane_decides_as_the_lua_lane(stacks: dict[str, Stack], doc: dict[str, Any],
                                                   path: str, data: st.DataObject) -> None:
    body = _mutate(data, json.dumps({k: v for k, v in doc.items() if v is not None},
                                    separators=(",", ":"), ensure_ascii=False).encode())
    lua, compiled = (outcome(stacks[k], path, body) for k in ("lua", "compiled"))
    if b"[" * MAX_DEPTH in body or not _json(body):
        # (its bound; and not JSON, which Envoy's parser sometimes took, e.g. with a NUL
        # after it): the ext_proc path, where the service answers
        assert not compiled[1], body
    else:
        assert compiled == lua, body


def _json(body: bytes) -> bool:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(body.decode("utf-8"), parse_constant=refuse)
    except ValueError:
        return False
    return True


def test_envoy_is_still_up_after_them(stacks: dict[str, Stack]) -> None:
    for s in stacks.values():
        admin = f"http://{s.config.envoy.admin_host}:{s.config.envoy.admin_port}/ready"
        assert httpx.get(admin, timeout=5).status_code == 200
        assert s.exited() is None
