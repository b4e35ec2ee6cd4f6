"""Property tests over the core: any body, however malformed, gets either a routing decision or
a 4xx JSON error that names the problem; never an exception. HYPOTHESIS_EXAMPLES scales the
run (`make fuzz` sets 100,000)."""

from __future__ import annotations

import base64
import json
import os

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import parse_config
from extproc.core.capabilities import judge_completion, request_needs
from extproc.core.errors import Refusal
from extproc.core.parts import PRESETS, convert_body, inspect_parts
from extproc.core.routing import RouteDecision, RoutingTable

from ..refusals import route_body

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "700"))
CFG = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
               suppress_health_check=list(HealthCheck))

TABLE = RoutingTable(parse_config({
    "backends": [
        {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:1/v1",
         "models": [{"name": "m", "capabilities": ["tools", "vision"], "tags": ["local"]}]},
        {"name": "l", "preset": "llamacpp", "url": "http://127.0.0.1:2/v1",
         "models": [{"name": "m-q", "capabilities": ["tools"]}]},
        {"name": "o", "preset": "ollama", "url": "http://127.0.0.1:3/v1",
         "models": [{"name": "m-o"}]},
    ],
    "models": [{"name": "pub", "aliases": ["p"], "candidates": [
        {"backend": "v", "model": "m"}, {"backend": "l", "model": "m-q"},
        {"backend": "o", "model": "m-o"}]}],
    "virtual_models": [{"name": "auto", "requires": ["tools"]}],
    "hints": {"policies": {"local": {"require_tags": ["local"]}},
              "access": [{"clients": ["*"], "allow": ["intent", "model", "backend", "order"]}]},
    "default_model": "pub",
}))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=30)

B64 = base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64)).decode()
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]),
                           "text": st.one_of(st.text(max_size=20), json_value)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.just(PNG), st.fixed_dictionaries({"url": st.one_of(st.just(PNG), st.text(max_size=30),
                                                              json_value)}), json_value)}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.one_of(
        st.fixed_dictionaries({"data": st.one_of(st.just(B64), st.text(max_size=12)),
                               "format": st.sampled_from(["wav", "mp3", "flac", "m4a", "x"])}),
        json_value)}),
    st.fixed_dictionaries({"type": st.sampled_from(["audio_url", "video_url"]),
                           "audio_url": st.one_of(st.just({"url": "data:audio/wav;base64," + B64}),
                                                  st.just({"url": "https://example.com/a.mp3"}),
                                                  json_value)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "input_image", "file",
                                                    "refusal"]),
                           "url": st.one_of(st.just(PNG), st.text(max_size=10))}),
    st.dictionaries(st.sampled_from(["type", "image_url", "text", "input_audio"]), json_value,
                    max_size=3),
    json_value,
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                           "content": st.one_of(st.text(max_size=20), st.lists(part, max_size=4),
                                                json_value)}),
    json_value)
near_valid = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["pub", "p", "auto", "m", "nope"]), json_value)},
    optional={
        "messages": st.one_of(st.lists(message, max_size=4), json_value),
        "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f"}}]),
                           json_value),
        "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]),
                                 st.just({"type": "function", "function": {"name": "f"}}),
                                 json_value),
        "response_format": st.one_of(st.just({"type": "json_object"}), st.just(
            {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}), json_value),
        "metadata": st.one_of(st.dictionaries(st.text(max_size=70), st.one_of(
            st.text(max_size=600), json_value), max_size=18), st.just(
            {"route_intent": "local", "route_order": "o,v"}), json_value),
        "stream": json_value,
        "reasoning_effort": json_value,
    })


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # the stdlib writes what orjson cannot (huge integers)


def check(body: bytes) -> None:
    try:
        out = route_body(TABLE, body)
    except Refusal as exc:
        assert 400 <= exc.reply.status < 500, exc.reply
        err = orjson.loads(exc.reply.body)["error"]
        assert err["message"] and err["code"], err
        return
    assert isinstance(out, RouteDecision) and out.candidates
    # What the attempt stage would do with it must not raise either.
    report = inspect_parts(out.body)
    for preset in PRESETS.values():
        data = orjson.loads(body)  # the route stage parsed it: so can the attempt stage
        try:
            convert_body(data, inspect_parts(data), preset, {
                p.url: ("image/png", b"\x89PNG") for p in report.parts if p.url})
        except Refusal as exc:
            assert 400 <= exc.reply.status < 500
    request_needs(out.body, out.sigs)


@CFG
@given(json_value)
def test_arbitrary_json_never_raises(value: object) -> None:
    check(dumps(value))


@CFG
@given(near_valid)
def test_near_valid_chat_requests_never_raise(body: dict) -> None:
    check(dumps(body))


@CFG
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    check(raw)


@CFG
@given(near_valid, st.integers(min_value=0, max_value=40))
def test_truncated_and_duplicated_keys(body: dict, cut: int) -> None:
    raw = dumps(body)
    check(raw[: max(0, len(raw) - cut)])
    check(b'{"model": "pub", ' + raw[1:])  # a duplicate "model" key


def test_deep_nesting_and_invalid_utf8() -> None:
    check(b'{"model": "pub", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    check(b'{"model": "pub\xff\xfe", "messages": []}')
    check(b'{"model": "pub", "messages": [{"role": "user", "content": "\xc3\x28"}]}')


@CFG
@given(json_value)
def test_response_judge_never_raises(value: object) -> None:
    from extproc.core.capabilities import Needs

    for needs in (Needs({"tools"}, {"tools"}, "f"), Needs({"json"}, {"json"}, schema={
            "type": "object", "required": ["a"]})):
        judge_completion(dumps(value), needs)
        judge_completion(dumps({"choices": [{"message": value}]}), needs)


@CFG
@given(st.lists(st.binary(max_size=60), max_size=6), json_value)
def test_stream_judge_never_raises(chunks: list[bytes], value: object) -> None:
    from extproc.core.capabilities import Needs, StreamJudge

    for needs in (Needs({"tools"}, {"tools"}, "f"), Needs({"json"}, {"json"})):
        judge = StreamJudge(needs)
        events = [*chunks, b"data: " + dumps({"choices": [{"delta": value}]}) + b"\n\n",
                  b"data: " + dumps(value) + b"\n\n"]
        for i, chunk in enumerate(events):
            judge.feed(chunk, end=i == len(events) - 1)


B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n -_é"


@CFG
@given(st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet=B64_CHARS, max_size=24),
    st.tuples(st.binary(min_size=1, max_size=48), st.integers(0, 200), st.sampled_from(
        B64_CHARS)).map(lambda t: (lambda s: s[:t[1] % len(s)] + t[2] + s[t[1] % len(s) + 1:])(
            base64.b64encode(t[0]).decode())),
))
def test_fast_base64_check_agrees_with_strict_decoding(text: str) -> None:
    """The one-pass validity check (no decoding) accepts only what strict decoding accepts, and
    every canonical encoding; what it refuses goes on to the slower checks (line breaks,
    oddities strict decoding tolerates), so refusing is always safe."""
    import binascii

    from extproc.core.parts import _strict_base64

    try:
        binascii.a2b_base64(text, strict_mode=True)
        strict = True
    except (binascii.Error, ValueError):
        strict = False
    assert strict or not _strict_base64(text)
    canonical = base64.b64encode(text.encode()).decode()
    assert _strict_base64(canonical)


# ---------------------------------------------------------------- the other APIs

anthropic_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=8),
                                                                     json_value)}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.one_of(
        st.just({"type": "base64", "media_type": "image/png", "data": B64}),
        st.just({"type": "url", "url": "https://example.com/i.png"}), json_value)}),
    st.fixed_dictionaries({"type": st.sampled_from(["tool_use", "tool_result", "document",
                                                    "thinking", "nope"])},
                          optional={"id": json_value, "name": json_value, "input": json_value,
                                    "tool_use_id": json_value, "content": json_value,
                                    "source": json_value}),
    json_value)
messages_body = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["pub", "nope"]), json_value)},
    optional={"messages": st.one_of(st.lists(st.fixed_dictionaries({
        "role": st.one_of(st.sampled_from(["user", "assistant"]), json_value),
        "content": st.one_of(st.text(max_size=8), st.lists(anthropic_block, max_size=4),
                             json_value)}), max_size=3), json_value),
              "system": json_value, "tools": json_value, "tool_choice": json_value,
              "output_format": json_value, "thinking": json_value, "max_tokens": json_value})
responses_body = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["pub", "nope"]), json_value)},
    optional={"input": st.one_of(st.text(max_size=8), st.lists(st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "developer"]),
                               "content": st.one_of(st.text(max_size=8), st.lists(
                                   st.dictionaries(st.sampled_from(
                                       ["type", "text", "image_url", "input_audio",
                                        "file_data"]), json_value, max_size=3), max_size=3))}),
        st.dictionaries(st.sampled_from(["type", "call_id", "name", "arguments", "output"]),
                        json_value, max_size=4), json_value), max_size=4), json_value),
              "instructions": json_value, "tools": json_value, "tool_choice": json_value,
              "text": json_value, "previous_response_id": json_value})


def check_api(body: dict, path: str) -> None:
    """Any body on another API routes or gets a 4xx naming the problem; its translation for
    a chat-only backend either works or is a 4xx; nothing else ever escapes."""
    from extproc.core.endpoints import BY_PATH
    from extproc.core.routing import route_request

    endpoint = BY_PATH[path]
    translator = endpoint.translator
    assert translator is not None
    try:
        orjson.loads(dumps(body))
    except orjson.JSONDecodeError:
        return  # not JSON as the route stage reads it (NaN, Infinity): a 400 there
    for call in (lambda: route_request(TABLE, orjson.loads(dumps(body)), endpoint=endpoint),
                 lambda: translator.to_chat(orjson.loads(dumps(body)), True, "vllm")):
        try:
            call()
        except Refusal as exc:
            assert 400 <= exc.reply.status < 500, exc.reply
            assert orjson.loads(exc.reply.body)["error"]["message"]


@CFG
@given(messages_body)
def test_messages_requests_never_raise(body: dict) -> None:
    check_api(body, "/v1/messages")


@CFG
@given(responses_body)
def test_responses_requests_never_raise(body: dict) -> None:
    check_api(body, "/v1/responses")


@CFG
@given(st.lists(st.one_of(st.binary(max_size=40), json_value.map(
    lambda v: b"data: " + dumps(v) + b"\n\n"), json_value.map(
    lambda v: b"data: " + dumps({"choices": [{"delta": v, "finish_reason": "stop"}]}) +
    b"\n\n")), max_size=6), json_value)
def test_answer_translation_never_raises(chunks: list[bytes], value: object) -> None:
    """Whatever a chat-only backend sends (streamed or whole), translating it never raises."""
    from extproc.core.endpoints.messages import TRANSLATOR as messages
    from extproc.core.endpoints.responses import TRANSLATOR as responses

    for translator in (messages, responses):
        stream = translator.stream({"model": "m"})
        for i, chunk in enumerate(chunks):
            stream.feed(chunk, i == len(chunks) - 1)
        stream.feed(b"", True)
        if isinstance(value, dict):
            translator.answer(value, {})
            translator.answer({"choices": [{"message": value, "finish_reason": value}]}, {})
        translator.error(500, dumps(value))
        judge_completion(dumps({"content": value, "output": value}), __import__(
            "extproc.core.capabilities", fromlist=["Needs"]).Needs({"tools"}, {"tools"}),
            "messages")
