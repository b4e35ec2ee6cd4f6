"""Which plan the route stage picks (sans-IO: the stream handler fed Envoy's two messages).

A body every candidate would get alike is prepared once, in the route stage; candidates that
take different parts get theirs per attempt; candidates whose part rules differ still share a
body that none of them needs changed."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.shell.runtime import Runtime
from extproc.shell.stages import RouteStream

from .media import b64, clip, data_url

WAV = clip("wav")
RT = Runtime.build(parse_config({
    "backends": [
        {"name": "v1", "preset": "vllm", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "same"}]},
        {"name": "s1", "preset": "sglang", "url": "http://127.0.0.1:8002/v1", "models": [{"name": "same"}]},
        {"name": "l1", "preset": "llamacpp", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "same"}]},
        {"name": "l2", "preset": "llamacpp", "url": "http://127.0.0.1:8004/v1",
         "models": [{"name": "same"}]},
    ],
    "models": [
        {"name": "vllm-sglang", "candidates": [{"backend": "v1", "model": "same"},
                                               {"backend": "s1", "model": "same"}]},
        {"name": "two-llamas", "candidates": [{"backend": "l1", "model": "same"},
                                              {"backend": "l2", "model": "same"}]},
        {"name": "one-llama", "candidates": [{"backend": "l1", "model": "same"}]},
    ],
}), env={})


def route(model: str, content: Any) -> tuple[dict[str, Any], pb.ProcessingResponse]:
    """The decision record and the body answer for one chat request."""
    s = RouteStream(RT)
    s.respond(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
            (":method", "POST"), (":path", "/v1/chat/completions"), ("x-request-id", "r"))]))))
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}]})
    out = s.respond(pb.ProcessingRequest(request_body=pb.HttpBody(body=body,
                                                                  end_of_stream=True)))
    if not isinstance(out, pb.ProcessingResponse):  # adapted here: drain the answers

        async def drain() -> list[pb.ProcessingResponse]:
            return [x async for x in out]

        out = asyncio.run(drain())[-1]
    assert out is not None
    return orjson.loads(s.record.to_json()), out


def sent_body(answer: pb.ProcessingResponse) -> dict[str, Any]:
    return orjson.loads(answer.request_body.response.body_mutation.body)


AUDIO_URL = {"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}}
INPUT_AUDIO = {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}


def test_text_is_one_body_even_for_candidates_with_different_part_rules() -> None:
    rec, _ = route("vllm-sglang", "hi")
    assert rec["plan"] == "judged"  # prepared here; the attempt stage only holds responses


def test_parts_every_candidate_takes_are_one_body() -> None:
    rec, answer = route("vllm-sglang", [AUDIO_URL])  # vLLM and SGLang both take audio_url
    assert rec["plan"] == "judged"
    assert sent_body(answer) == {"model": "same", "messages": [{"role": "user",
                                                                "content": [AUDIO_URL]}]}


def test_parts_only_some_candidates_take_are_adapted_per_attempt() -> None:
    rec, answer = route("vllm-sglang", [{"type": "input_text", "text": "hi"}])
    assert rec["plan"] == "per_attempt"  # vLLM takes input_text, SGLang needs text
    part = sent_body(answer)["messages"][0]["content"][0]
    assert part == {"type": "input_text", "text": "hi"}  # each attempt reshapes its own


def test_candidates_alike_get_the_body_converted_once_here() -> None:
    for model, plan in (("one-llama", "direct"), ("two-llamas", "judged")):
        rec, answer = route(model, [AUDIO_URL])
        assert rec["plan"] == plan
        assert sent_body(answer)["messages"][0]["content"] == [INPUT_AUDIO]
        meta = answer.dynamic_metadata.fields["extproc"].struct_value.fields
        assert meta["converted"].string_value == "1"
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answer.request_body.response.header_mutation.set_headers}
        assert sets["content-length"] == str(len(answer.request_body.response.body_mutation
                                                 .body))
