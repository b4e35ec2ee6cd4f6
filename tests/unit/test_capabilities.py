"""Capabilities core: needs and forcing, ranking, whole-body and streaming judges, error gaps."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.capabilities import (
    PASS,
    UNKNOWN,
    Caps,
    Inflater,
    Needs,
    StreamJudge,
    capability_gap,
    judge_completion,
    rank,
    readable_accept_encoding,
    request_needs,
)
from extproc.core.parts import Sig

from ..refusals import refused

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.mark.parametrize(("extra", "needed", "forced", "name"), [
    ({"tools": TOOLS}, {"tools"}, set(), None),
    ({"tools": TOOLS, "tool_choice": "auto"}, {"tools"}, set(), None),
    ({"tools": TOOLS, "tool_choice": "none"}, {"tools"}, set(), None),
    ({"tools": TOOLS, "tool_choice": "required"}, {"tools"}, {"tools"}, None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     {"tools"}, {"tools"}, "get_weather"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools",
                                      "allowed_tools": {"mode": "required", "tools": []}}},
     {"tools"}, {"tools"}, None),
    ({"functions": [{"name": "f"}], "function_call": {"name": "f"}}, {"tools"}, {"tools"}, "f"),
    ({"tools": [], "tool_choice": "required"}, set(), set(), None),
    ({"response_format": {"type": "json_object"}}, {"json"}, {"json"}, None),
    ({"response_format": {"type": "text"}}, set(), set(), None),
    ({"reasoning_effort": "high"}, {"reasoning"}, set(), None),
    ({"reasoning_effort": None}, set(), set(), None),
])
def test_request_needs(extra: dict, needed: set, forced: set, name: str | None) -> None:
    n = request_needs({"model": "m", "messages": [], **extra}, [])
    assert (n.needed, n.forced, n.tool_name) == (needed, forced, name)


def test_parts_add_vision_and_audio_needs() -> None:
    n = request_needs({}, [Sig("image_url", "image", "data", "png"), Sig("input_audio", "audio")])
    assert n.needed == {"vision", "audio"} and n.forced == set()


def declared(*caps: str) -> Caps:
    return Caps(frozenset(caps), None)


def test_rank() -> None:
    assert rank(declared("tools"), {"tools"}, set()) == 0
    assert rank(UNKNOWN, {"tools"}, set()) == 1
    assert rank(declared(), {"vision"}, {"vision"}) == 1
    assert rank(declared("json"), {"tools", "json"}, set()) == 2
    assert rank(declared(), set(), set()) == 0
    # A backend that reports only its modalities: tools stay unknown, a missing image is known.
    reported = Caps(frozenset({"audio"}), frozenset({"vision", "audio"}), detected=True)
    assert rank(reported, {"tools", "audio"}, set()) == 1
    assert rank(reported, {"vision"}, set()) == 2 and reported.lacks("vision")
    assert not reported.lacks("tools")


def completion(message: dict, finish: str = "stop") -> bytes:
    return orjson.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}]})


FORCED_TOOLS = Needs({"tools"}, {"tools"})
CALL = {"content": None, "tool_calls": [{"id": "1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": "{}"}}]}


def test_judge_tools() -> None:
    assert judge_completion(completion(CALL), FORCED_TOOLS).ok is True
    v = judge_completion(completion({"content": "It is sunny."}), FORCED_TOOLS)
    assert v.ok is False and "no tool call" in v.reason
    named = Needs({"tools"}, {"tools"}, tool_name="other")
    v = judge_completion(completion(CALL), named)
    assert v.ok is False and "'other'" in v.reason
    v = judge_completion(completion({"content": "partial"}, "length"), FORCED_TOOLS)
    assert v.reason == "tools: truncated before a tool call"


def test_judge_json_hands_schema_checks_on() -> None:
    """JSON validity is judged here; the schema check is untrusted work for the sandbox, so the
    verdict carries the values still to check."""
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    needs = Needs({"json"}, {"json"}, schema=schema)
    v = judge_completion(completion({"content": '{"city": "Oslo"}'}), needs)
    assert v.ok is True and v.schema_values == ('{"city": "Oslo"}',)
    assert judge_completion(completion({"content": "{}"}), Needs({"json"}, {"json"})) == PASS
    v = judge_completion(completion({"content": "Oslo is nice"}), Needs({"json"}, {"json"}))
    assert v.ok is False and v.reason == "json: content is not valid JSON"
    v = judge_completion(completion({"content": '{"city": "Os'}, "length"), needs)
    assert v.reason == "json: truncated (finish_reason length)"


def test_tool_reasons_name_the_forced_function_not_the_answer() -> None:
    named = Needs({"tools"}, {"tools"}, tool_name="get_time")
    v = judge_completion(completion(CALL), named)
    assert v.reason == "tools: called another function than the forced 'get_time'"
    assert "get_weather" not in v.reason  # model output stays out of headers and logs
    j = StreamJudge(named)
    v = j.feed(b"".join(sse({"tool_calls": [{"index": 0, "function": {"name": "evil"}}]})))
    assert v.ok is False and "evil" not in v.reason


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": {}}, "tools"),
    ({"tool_choice": {"function": 5}}, "tool_choice.function"),
    ({"tool_choice": {"function": {"name": 1}}}, "tool_choice.function.name"),
    ({"tool_choice": {"name": []}}, "tool_choice.name"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": "x"}}, "tool_choice.allowed_tools"),
    ({"function_call": 5}, "function_call"),
    ({"response_format": []}, "response_format"),
    ({"response_format": {"type": 1}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
     "response_format.json_schema.schema"),
])
def test_request_needs_refuses_wrong_shapes_naming_the_field(extra: dict, param: str) -> None:
    assert refused(request_needs, {"tools": TOOLS, **extra}, [])["param"] == param


def test_oversized_schema_is_not_carried() -> None:
    schema = {"type": "object", "description": "x" * 5000}
    rf = {"type": "json_schema", "json_schema": {"schema": schema}}
    assert request_needs({"response_format": rf}, []).schema == schema
    n = request_needs({"response_format": rf}, [], max_schema_bytes=1024)
    assert n.schema is None and n.forced == {"json"}  # still judged as JSON


def test_unparseable_bodies_are_not_judged() -> None:
    for body in (b"<html>", b"{}", b'{"choices": []}', b'{"choices": "x"}', b"[1]"):
        assert judge_completion(body, FORCED_TOOLS).ok is None


def sse(*deltas: dict) -> list[bytes]:
    return [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": d}]}) + b"\n\n"
            for d in deltas] + [b"data: [DONE]\n\n"]


def test_stream_judge_decides_at_first_deciding_event() -> None:
    events = sse({"role": "assistant", "content": ""},
                 {"tool_calls": [{"index": 0, "function": {"name": "get_weather"}}]})
    j = StreamJudge(FORCED_TOOLS)
    assert j.feed(events[0]) is None  # the role-only delta decides nothing
    assert j.feed(events[1]).ok is True
    j = StreamJudge(FORCED_TOOLS)
    assert j.feed(b"".join(sse({"role": "assistant"}, {"content": "Sure"}))).ok is False
    # An event split across chunks is reassembled.
    raw = b"".join(sse({"content": "Hi"}))
    j = StreamJudge(FORCED_TOOLS)
    assert j.feed(raw[:10]) is None and j.feed(raw[10:]).ok is False
    j = StreamJudge(Needs({"json"}, {"json"}))
    assert j.feed(b"".join(sse({"content": "  {\"a\""}))).ok is True
    j = StreamJudge(Needs({"json"}, {"json"}))
    assert j.feed(b"".join(sse({"content": "Here is"}))).ok is False
    j = StreamJudge(FORCED_TOOLS)
    assert j.feed(b"data: [DONE]\n\n", end=True).ok is False  # ended with no tool call


def test_capability_gaps_from_real_error_texts() -> None:
    assert capability_gap(400, b'{"error":{"message":"m is not a multimodal model"}}') == "vision"
    assert capability_gap(500, b'{"error":{"message":"image input is not supported - hint"}}') \
        == "vision"
    assert capability_gap(400, b"model x does not support tools") == "tools"
    assert capability_gap(500, b"out of memory") is None
    assert capability_gap(200, b"is not a multimodal model") is None


def test_inflater_decodes_in_pieces_and_stops_at_its_limit() -> None:
    import gzip
    import zlib

    body = completion({"content": "It is sunny."})
    packed = gzip.compress(body)
    inf = Inflater("gzip", 1 << 20)
    out = b"".join(inf.feed(packed[i:i + 7]) or b"" for i in range(0, len(packed), 7))
    assert out == body
    assert Inflater("deflate", 1 << 20).feed(zlib.compress(body)) == body
    bomb = gzip.compress(b"\0" * (50 << 20))  # 50 MB of zeros in ~50 KB
    inf = Inflater("gzip", 4 << 20)
    assert inf.feed(bomb) is None and inf.feed(b"more") is None
    assert Inflater("gzip", 1 << 20).feed(b"not gzip at all") is None


@pytest.mark.parametrize(("given", "readable"), [
    ("gzip, deflate", "gzip, deflate"),
    ("gzip, deflate, br, zstd", "gzip, deflate"),
    ("br;q=1.0, GZIP;q=0.8, *;q=0.1", "GZIP;q=0.8"),
    ("br", None),
    ("identity", "identity"),
])
def test_readable_accept_encoding(given: str, readable: str | None) -> None:
    assert readable_accept_encoding(given) == readable


ALL_BAD = {"empty_answer", "no_choices", "content_filter", "invalid_tool_arguments",
           "stream_without_content"}


@pytest.mark.parametrize(("body", "reason"), [
    (completion({"content": ""}), "empty_answer"),
    (completion({"content": "   "}), "empty_answer"),
    (completion({"content": None}), "empty_answer"),
    (orjson.dumps({"choices": []}), "no_choices"),
    (orjson.dumps({"choices": None}), "no_choices"),
    (completion({"content": "x"}, "content_filter"), "content_filter"),
    (completion({"content": None, "tool_calls": [{"function": {"name": "f", "arguments":
                                                               "{oops"}}]}),
     "invalid_tool_arguments"),
])
def test_bad_answers_fail_only_when_opted_into(body: bytes, reason: str) -> None:
    v = judge_completion(body, Needs(bad=ALL_BAD))
    assert v.ok is False and v.reason.startswith(reason + ":")
    assert judge_completion(body, Needs(bad=ALL_BAD - {reason})).ok is not False
    assert judge_completion(body, Needs()).ok is not False


def test_good_answers_pass_every_rule() -> None:
    needs = Needs(bad=ALL_BAD)
    assert judge_completion(completion({"content": "Prose, though tools were offered."}),
                            needs) == PASS
    assert judge_completion(completion(CALL), needs) == PASS  # a tool call, no content
    assert judge_completion(b'{"object": "list", "data": []}', needs).ok is None  # not chat


def test_stream_bad_answer_rules() -> None:
    rules = Needs(bad=ALL_BAD)
    j = StreamJudge(rules)  # ends after its role delta
    assert j.feed(b"".join(sse({"role": "assistant", "content": ""})), end=True).reason == \
        "stream_without_content: the stream ended before any content"
    j = StreamJudge(rules)
    assert j.feed(b'data: {"error": {"message": "overloaded"}}\n\n').reason == \
        "stream_without_content: the stream errored before any content"
    j = StreamJudge(rules)
    filtered = b"data: " + orjson.dumps({"choices": [{"delta": {}, "finish_reason":
                                                       "content_filter"}]}) + b"\n\n"
    assert j.feed(filtered).reason.startswith("content_filter:")
    for needs in (rules, Needs()):  # the first content decides; without rules, nothing fails
        j = StreamJudge(needs)
        assert j.feed(b"".join(sse({"role": "assistant"}, {"content": "Hi"}))) == PASS
    j = StreamJudge(Needs())
    assert j.feed(b"".join(sse({"role": "assistant", "content": ""})), end=True).ok is None
