"""The endpoints without Envoy: uploads read and rewritten byte for byte, Messages and
Responses translated both ways (the official SDKs' own models parse what comes out), the
candidates each API can reach, paths per backend, errors in each API's envelope."""

from __future__ import annotations

import anthropic.types
import openai.types.responses
import orjson
import pytest

from extproc.config import parse_config
from extproc.contract import HandOff
from extproc.core.backends import BackendRuntime, target_path
from extproc.core.endpoints import BY_PATH, PRESET_APIS, Api, in_envelope
from extproc.core.endpoints.messages import TRANSLATOR as MESSAGES
from extproc.core.endpoints.responses import TRANSLATOR as RESPONSES
from extproc.core.errors import error_reply
from extproc.core.form import MAX_PARTS, parse_form, set_text
from extproc.core.plan import RequestView
from extproc.core.routing import RoutingTable, route_request
from extproc.runtime import Runtime

from ..refusals import refused

# ---------------------------------------------------------------- uploads

CT = "multipart/form-data; boundary=XyZ"


def upload(*fields: tuple[str, bytes, str | None]) -> bytes:
    out = b"preamble\r\n"
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--XyZ\r\nContent-Disposition: " + disp.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--XyZ--\r\n"


def test_form_fields_are_read_and_only_the_model_changes() -> None:
    audio = b"RIFF\x00\r\n--XyZ-not-a-delimiter\r\n\x00\xff" * 100
    body = upload(("model", b"whisper", None), ("file", audio, "a.wav"), ("stream", b"true", None))
    form = parse_form(body, CT)
    assert form.text(body, "model") == "whisper" and form.text(body, "stream") == "true"
    assert form.text(body, "file") is None  # a file is not a text field
    new = set_text(body, form, "model", "whisper-large-v3")
    assert new == body.replace(b"whisper\r\n", b"whisper-large-v3\r\n", 1)
    f = next(x for x in parse_form(new, CT).fields if x.name == "file")
    assert new[f.start:f.end] == audio
    added = set_text(upload(("file", audio, "a.wav")),
                     parse_form(upload(("file", audio, "a.wav")), CT), "model", "m")
    assert parse_form(added, CT).text(added, "model") == "m"


@pytest.mark.parametrize(("body", "ctype", "code"), [
    (upload(("model", b"m", None)), "application/json", "invalid_content_type"),
    (upload(("model", b"m", None)), "multipart/form-data", "invalid_form"),  # no boundary
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end", CT, "invalid_form"),
    (b"--XyZ\r\n" + b"x" * 9000, CT, "invalid_form"),  # headers never end
    (b"--XyZ\r\nContent-Type: text/plain\r\n\r\nv\r\n--XyZ--", CT, "invalid_form"),  # no name
    (upload(*[("f", b"v", None)] * (MAX_PARTS + 1)), CT, "invalid_form"),
])
def test_hostile_uploads_get_a_400_naming_the_problem(body: bytes, ctype: str,
                                                      code: str) -> None:
    assert refused(parse_form, body, ctype)["code"] == code


# ---------------------------------------------------------------- Messages

def test_messages_read_as_chat() -> None:
    body = {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["X"], "stream": True, "tool_choice": {"type": "any"},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "AAAA"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [
                        {"type": "text", "text": "done"},
                        {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}}]},
                    {"type": "text", "text": "and?"}]}]}
    view = MESSAGES.to_chat(body, True, "vllm")
    assert view.data == {
        "model": "m", "max_tokens": 10, "stop": ["X"], "stream": True,
        "stream_options": {"include_usage": True}, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f",
                                                    "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": "calling", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f",
                                                              "arguments": '{"a":1}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "done"},
            {"role": "user", "content": [  # the tool result's image, then the rest
                {"type": "image_url", "image_url": {"url": "https://x/i.png"}},
                {"type": "text", "text": "and?"}]}]}
    assert view.origins[(4, 0)].keys == ("messages", 2, "content", 0, "content", 1)
    assert view.origins[(1, 1)].leaf == "messages[0].content[1].source.data"


def test_messages_write_back_keeps_the_blocks_shape() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/i.png"},
         "cache_control": {"type": "ephemeral"}}]}]}
    view = MESSAGES.to_chat(body, False, "")
    MESSAGES.write_back(body, view.origins[(0, 0)], {
        "type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}})
    assert body["messages"][0]["content"][0] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                    "data": "QUJD"}, "cache_control": {"type": "ephemeral"}}
    MESSAGES.write_back(body, view.origins[(0, 0)], {"type": "text", "text": "a cat"})
    assert body["messages"][0]["content"][0]["text"] == "a cat"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": "x"}]}]},
     "messages[0].content[0].source"),
    ({"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0]"),
    ({"messages": [], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "url", "url": "http://10.0.0.1/a.pdf"}}]}]}, "messages[0].content[0].source"),
])
def test_messages_that_cannot_be_translated_name_the_field(body: dict, param: str) -> None:
    assert refused(MESSAGES.to_chat, body, True, "vllm")["param"] == param


def test_documents_and_files_by_url_are_refused_even_for_native_backends() -> None:
    """Whoever read them would fetch them outside the fetch policy."""
    doc = {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "url", "url": "http://169.254.169.254/x.pdf"}}]}]}
    assert refused(MESSAGES.to_chat, doc, False, "")["code"] == "unsupported_content"
    file = {"input": [{"role": "user", "content": [{"type": "input_file",
                                                    "file_url": "http://10.0.0.1/a.pdf"}]}]}
    assert refused(RESPONSES.to_chat, file, False, "")["param"] == "input[0].content[0].file_url"


def test_messages_answer_from_chat_parses_as_the_sdks_message() -> None:
    chat = {"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "ok", "reasoning_content": "why",
                        "tool_calls": [{"id": "c1", "type": "function", "function": {
                            "name": "f", "arguments": '{"a": 1}'}},
                            {"id": "c2", "type": "function", "function": {
                                "name": "g", "arguments": "not json"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    out = MESSAGES.answer(chat, {"model": "m"})
    msg = anthropic.types.Message.model_validate(out)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert msg.content[2].input == {"a": 1}
    assert msg.content[3].input == {"_unparsed_arguments": "not json"}
    assert msg.stop_reason == "tool_use" and msg.usage.input_tokens == 3
    stopped = MESSAGES.answer({"choices": [{"finish_reason": "stop", "stop_reason": "END",
                                            "message": {"content": "x"}}]}, {})
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")


def sse_chat(*deltas: dict, finish: str = "stop", usage: bool = True) -> list[bytes]:
    chunks = [{"id": "chatcmpl-9", "model": "m", "choices": [
        {"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"id": "chatcmpl-9", "model": "m", "choices": [
        {"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage:
        chunks.append({"id": "chatcmpl-9", "model": "m", "choices": [],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def events(raw: bytes) -> list[dict]:
    return [orjson.loads(block.split(b"\ndata: ", 1)[1]) for block in raw.split(b"\n\n")
            if block.strip()]


def test_messages_stream_from_chat_chunks_split_anywhere() -> None:
    raw = b"".join(sse_chat({"role": "assistant", "content": ""}, {"content": "Hel"},
                            {"content": "lo"}, {"tool_calls": [{"index": 0, "id": "c1",
                             "function": {"name": "f", "arguments": ""}}]},
                            {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                            {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                            finish="tool_calls"))
    tx = MESSAGES.stream({"model": "m"})
    out = b"".join(tx.feed(raw[i:i + 7], False) for i in range(0, len(raw), 7)) + \
        tx.feed(b"", True)
    evs = events(out)
    assert [e["type"] for e in evs] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert "".join(e["delta"].get("text", "") for e in evs if e["type"] ==
                   "content_block_delta") == "Hello"
    assert evs[5]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert "".join(e["delta"].get("partial_json", "") for e in evs[6:8]) == '{"a":1}'
    assert evs[-2]["delta"]["stop_reason"] == "tool_use"
    assert evs[-2]["usage"] == {"input_tokens": 5, "output_tokens": 2}
    msg = anthropic.types.Message.model_validate(evs[0]["message"])
    assert msg.role == "assistant"


def test_messages_stream_turns_a_backend_error_into_an_error_event() -> None:
    tx = MESSAGES.stream({})
    out = tx.feed(b'data: {"error": {"message": "engine died"}}\n\n', False) + \
        tx.feed(b"", True)
    evs = events(out)
    assert evs[-1] == {"type": "error", "error": {"type": "api_error",
                                                  "message": "engine died"}}
    assert [e["type"] for e in evs] == ["error"]  # nothing after it


def test_errors_in_anthropics_envelope() -> None:
    reply = in_envelope(BY_PATH["/v1/messages"], error_reply(
        404, "no such model", code="model_not_found", param="model"))
    assert orjson.loads(reply.body) == {"type": "error", "error": {
        "type": "not_found_error", "message": "no such model", "code": "model_not_found",
        "param": "model"}}
    same = error_reply(404, "x", code="c")
    assert in_envelope(BY_PATH["/v1/chat/completions"], same) is same
    assert orjson.loads(MESSAGES.error(503, b'{"error": "overloaded"}')) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}}


# ---------------------------------------------------------------- Responses

def test_responses_read_as_chat() -> None:
    body = {"model": "m", "instructions": "brief", "max_output_tokens": 20,
            "text": {"format": {"type": "json_schema", "name": "out",
                                "schema": {"type": "object"}}},
            "reasoning": {"effort": "low"}, "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "input": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "see"},
                    {"type": "input_image", "image_url": "https://x/i.png", "detail": "low"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
                {"type": "reasoning", "summary": []}]}
    view = RESPONSES.to_chat(body, True, "vllm")
    assert view.data == {
        "model": "m", "max_tokens": 20, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "out", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "f",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "messages": [
            {"role": "system", "content": "brief"}, {"role": "system", "content": "rules"},
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "https://x/i.png",
                                                    "detail": "low"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    assert view.origins[(2, 1)].path == "input[1].content[1]"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "r1"}, "previous_response_id"),
    ({"input": "x", "conversation": "c1"}, "conversation"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "item_reference", "id": "i1"}]}, "input[0]"),
    ({"input": 5}, "input"),
])
def test_responses_that_cannot_be_translated_name_the_field(body: dict, param: str) -> None:
    assert refused(RESPONSES.to_chat, body, True, "vllm")["param"] == param


def test_responses_answer_from_chat_parses_as_the_sdks_response() -> None:
    chat = {"id": "chatcmpl-2", "created": 5, "model": "m", "choices": [
        {"index": 0, "finish_reason": "length", "message": {
            "role": "assistant", "content": "partial", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f",
                                                              "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    out = RESPONSES.answer(chat, RESPONSES.echo({"model": "m", "instructions": "brief"}))
    r = openai.types.responses.Response.model_validate(out)
    assert r.output_text == "partial" and r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == \
        "max_output_tokens"
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.instructions == "brief" and r.usage is not None and r.usage.total_tokens == 7


def test_responses_stream_from_chat_chunks() -> None:
    raw = b"".join(sse_chat({"role": "assistant"}, {"reasoning_content": "think"},
                            {"content": "Hi"}, {"content": " there"}))
    tx = RESPONSES.stream({"model": "m"})
    evs = events(b"".join(tx.feed(raw[i:i + 5], False) for i in range(0, len(raw), 5))
                 + tx.feed(b"", True))
    adapter = openai.types.responses.ResponseStreamEvent
    from pydantic import TypeAdapter

    parsed = [TypeAdapter(adapter).validate_python(e) for e in evs]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") == \
        "Hi there"
    done = parsed[-1]
    assert done.type == "response.completed"
    assert [o.type for o in done.response.output] == ["reasoning", "message"]
    assert done.response.output_text == "Hi there"
    assert done.response.usage is not None and done.response.usage.output_tokens == 2


# ---------------------------------------------------------------- routing and planning

CFG = parse_config({
    "backends": [
        {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "a"}]},
        {"name": "old", "preset": "vllm", "apis": ["chat"], "url": "http://127.0.0.1:8002/v1",
         "models": [{"name": "a"}]},
        {"name": "oa", "preset": "openai", "url": "http://127.0.0.1:8003/v1", "models": [{"name": "a"}]},
        {"name": "az", "preset": "azure", "url": "http://127.0.0.1:8004", "api_version": "2025-01",
         "models": [{"name": "a"}]},
    ],
    "models": [
        {"name": "both", "candidates": [{"backend": "old", "model": "a"},
                                        {"backend": "v", "model": "a"}]},
        {"name": "cloud", "candidates": [{"backend": "oa", "model": "a"},
                                         {"backend": "az", "model": "a"}]},
    ],
    "expose_backend_models": False,
})


def test_presets_speak_what_their_servers_serve() -> None:
    assert Api.MESSAGES in PRESET_APIS["vllm"] and Api.MESSAGES not in PRESET_APIS["openai"]
    assert Api.RERANK in PRESET_APIS["llamacpp"] and Api.RERANK not in PRESET_APIS["ollama"]
    assert {Api.RESPONSES, Api.MESSAGES} <= PRESET_APIS["ollama"]


def test_candidates_without_the_api_are_translated_or_dropped() -> None:
    table = RoutingTable(CFG)
    body = {"model": "both", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    d = route_request(table, body, endpoint=BY_PATH["/v1/messages"])
    assert [t.backend for t in d.candidates] == ["old", "v"]
    assert {t.backend for t in d.translated} == {"old"}
    d = route_request(table, {"model": "both", "query": "q", "documents": []},
                      endpoint=BY_PATH["/v1/rerank"])
    assert [t.backend for t in d.candidates] == ["v"] and d.dropped[0][0].backend == "old"
    err = refused(route_request, table, {"model": "cloud", "messages": []}, None, None, 0.0,
                  lambda: 0.5, BY_PATH["/v1/messages/count_tokens"])
    assert err["code"] == "unsupported_endpoint" and err["models_serving_endpoint"] == ["both"]
    # What translation cannot carry leaves the native candidates alone.
    d = route_request(table, {"model": "both", "input": "x", "previous_response_id": "r"},
                      endpoint=BY_PATH["/v1/responses"])
    assert [t.backend for t in d.candidates] == ["v"] and not d.translated


def test_translated_requests_are_planned_per_attempt_with_each_backends_path() -> None:
    rt = Runtime.build(CFG, env={})
    table, planner = rt.table, rt.planner
    body = {"model": "both", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    raw = orjson.dumps(body)
    d = route_request(table, body, endpoint=BY_PATH["/v1/messages"])
    plan = planner.route(RequestView("POST", "/v1/messages?beta=true", {}, raw, body), d)
    assert plan.kind == "per_attempt"
    handoff = HandOff.decode({f"metadata.filter_metadata['extproc']['{k}']": v
                              for k, v in plan.metadata.items()})
    assert handoff is not None and handoff.endpoint is BY_PATH["/v1/messages"]
    first = planner.attempt(handoff, 1, "127.0.0.1:8002", "/v1/messages?beta=true", True)
    assert first.translated and first.work is not None and first.work.translated
    assert (":path", "/v1/chat/completions") in first.set_headers
    assert ("accept-encoding", "identity") in first.set_headers
    second = planner.attempt(handoff, 2, "127.0.0.1:8001", "/v1/chat/completions", True)
    assert not second.translated and (":path", "/v1/messages?beta=true") in second.set_headers


def test_azure_backends_get_deployment_paths() -> None:
    az = BackendRuntime("az", "api-key", "k", False, "/openai", "azure", "2025-01")
    chat, responses = BY_PATH["/v1/chat/completions"], BY_PATH["/v1/responses"]
    assert target_path(az, chat, False, "/v1/chat/completions?x=1", "gpt 4o") == \
        "/openai/deployments/gpt%204o/chat/completions?api-version=2025-01"
    assert target_path(az, responses, False, "/v1/responses", "gpt") == \
        "/openai/responses?api-version=2025-01"
    b = next(b for b in CFG.backends if b.name == "az")
    assert (b.auth_header, b.auth_scheme) == ("api-key", "")
