"""The planner, without protobuf or Envoy: which way a request's attempts are handled (direct,
judged, per attempt), what each attempt's request needs, which answers are held.

A body every candidate would get alike is prepared once, in the route stage; candidates that
take different parts get theirs per attempt; candidates whose part rules differ still share a
body that none of them needs changed."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from extproc.config import parse_config
from extproc.contract import HandOff, Meta, attribute
from extproc.core.capabilities import Needs
from extproc.core.endpoints import BY_PATH
from extproc.core.plan import BodyWork, RequestView, RoutePlan
from extproc.core.routing import RouteDecision, route_request
from extproc.runtime import Runtime

from ..media import clip, data_url, text_image
from ..refusals import refused

WAV = clip("wav")
RT = Runtime.build(parse_config({
    "backends": [
        {"name": "v1", "preset": "vllm", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "same"}]},
        {"name": "s1", "preset": "sglang", "url": "http://127.0.0.1:8002/v1", "models": [{"name": "same"}]},
        {"name": "l1", "preset": "llamacpp", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "same"}]},
        {"name": "l2", "preset": "llamacpp", "url": "http://127.0.0.1:8004/v1",
         "models": [{"name": "same"}]},
        {"name": "o1", "preset": "openai", "url": "http://127.0.0.1:8005/openai/v1",
         "api_key_env": "O_KEY", "models": [{"name": "other"}]},
    ],
    "models": [
        {"name": "vllm-sglang", "candidates": [{"backend": "v1", "model": "same"},
                                               {"backend": "s1", "model": "same"}]},
        {"name": "two-llamas", "candidates": [{"backend": "l1", "model": "same"},
                                              {"backend": "l2", "model": "same"}]},
        {"name": "one-llama", "candidates": [{"backend": "l1", "model": "same"}]},
        {"name": "mixed", "candidates": [{"backend": "v1", "model": "same"},
                                         {"backend": "o1", "model": "other"}]},
    ],
}), env={"O_KEY": "sek"})

AUDIO_URL = {"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}}


def plan(model: str, content: Any, headers: dict[str, str] | None = None, **extra: Any
         ) -> tuple[RoutePlan, RouteDecision]:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                         **extra})
    data = orjson.loads(body)
    d = route_request(RT.table, data, headers or {})
    return RT.planner.route(RequestView("POST", "/v1/chat/completions?x=1", headers or {},
                                        body, data), d), d


def handoff(p: RoutePlan) -> HandOff:
    """What the attempt stage decodes from the attributes Envoy sends it."""
    h = HandOff.decode({attribute(Meta(k)): v for k, v in p.metadata.items()
                        if k in {m.value for m in Meta}})
    assert h is not None
    return h


def test_text_is_one_body_even_for_candidates_with_different_part_rules() -> None:
    p, _ = plan("vllm-sglang", "hi")
    assert (p.kind, p.cluster.value) == ("judged", "llm_backends_judged")
    assert p.work is None and orjson.loads(p.body or b"")["model"] == "same"
    assert handoff(p).candidates[0].backend == "v1"


def test_parts_every_candidate_takes_are_one_body() -> None:
    p, _ = plan("vllm-sglang", [AUDIO_URL])  # vLLM and SGLang both take audio_url
    assert p.kind == "judged" and p.work is None
    assert orjson.loads(p.body or b"")["messages"][0]["content"] == [AUDIO_URL]


def test_parts_only_some_candidates_take_are_adapted_per_attempt() -> None:
    flac = {"type": "input_audio", "input_audio": {"data": base64.b64encode(
        clip("flac")).decode(), "format": "flac"}}  # vLLM takes FLAC, SGLang wav or mp3
    p, d = plan("vllm-sglang", [flac])
    assert (p.kind, p.cluster.value) == ("per_attempt", "llm_backends")
    h = handoff(p)
    assert h.sigs == tuple(d.sigs) and h.body_model == "same"
    first = RT.planner.attempt(h, 1, "127.0.0.1:8001", "/v1/chat/completions", True)
    assert first.target.backend == "v1" and first.work is None and not first.needs_body
    assert first.needs_response  # another candidate remains: held whole for failover
    second = RT.planner.attempt(h, 2, "127.0.0.1:8002", "/v1/chat/completions", True)
    assert second.last and second.work == BodyWork("s1", "same") and second.needs_body


def test_candidates_alike_get_the_body_work_done_once_here() -> None:
    for model, kind in (("one-llama", "direct"), ("two-llamas", "judged")):
        p, _ = plan(model, [AUDIO_URL])
        assert p.kind == kind and p.work == BodyWork("l1", "same") and p.body is None
    p, _ = plan("one-llama", [AUDIO_URL])
    assert (p.metadata[Meta.BACKEND], p.metadata[Meta.MODEL]) == ("l1", "same")
    assert Meta.CANDIDATES not in p.metadata  # no attempt stage will read it


def test_an_attempt_gets_its_own_credentials_path_and_model() -> None:
    p, _ = plan("mixed", "hi", headers={"authorization": "Bearer client"})
    assert p.kind == "per_attempt" and "authorization" in p.remove_headers
    h = handoff(p)
    assert h.path == "/v1/chat/completions?x=1" and h.body_model == "mixed"  # as the client
    second = RT.planner.attempt(h, 2, "127.0.0.1:8005", "/v1/chat/completions?x=1", True)
    assert set(second.set_headers) == {("authorization", "Bearer sek"),
                                       (":path", "/openai/v1/chat/completions?x=1")}
    assert second.needs_body  # its model is "other": the body's model is rewritten
    err = refused(RT.planner.attempt, h, 1, "10.9.9.9:1", "/", True)
    assert (err["status"], err["code"]) == (502, "unexpected_upstream")


def test_which_answers_are_held() -> None:
    r = RT.planner.response
    judged = Needs({"tools"}, {"tools"})
    json_h = {"content-type": "application/json"}
    sse = {"content-type": "text/event-stream"}
    assert r(200, json_h, False, None, False, 0).hold  # held whole while another remains
    assert not r(200, json_h, False, None, True, 0).hold  # the last: nothing to fail over to
    assert not r(200, sse, False, None, False, 0).hold  # a stream costs a message per chunk
    held = r(200, sse, False, judged, True, 0)
    assert held.hold and held.stream and held.needs == judged  # judged: held until it decides
    gz = r(200, {**json_h, "content-encoding": "gzip"}, False, judged, True, 0)
    assert gz.hold and gz.inflate == "gzip"
    br = r(200, {**json_h, "content-encoding": "br"}, False, judged, True, 0)
    assert br.unreadable == "br" and not br.hold
    limited = r(429, {"retry-after": "7", **json_h}, False, None, False, 0)
    assert limited.rate_limited and limited.retry_after_s == 7 and not limited.hold  # Envoy retries it
    assert not r(503, {"retry-after": "7", **json_h}, False, None, False, 0).rate_limited


def test_inside_ai_gateway_the_body_is_prepared_whole_and_no_routing_header_is_set() -> None:
    """No attempt stage exists inside Envoy AI Gateway: parts are reshaped here, for the first
    candidate, and the body keeps the public name AIGW routes on; none of our routing headers
    (they would reach the backend) is set."""
    rt = Runtime.build(parse_config({
        "ai_gateway": {"model_header": "x-ai-eg-model"},
        "backends": [{"name": "v1", "preset": "vllm", "url": "http://127.0.0.1:8001/v1",
                      "models": [{"name": "served"}]},
                     {"name": "o1", "preset": "openai", "url": "http://127.0.0.1:8005/v1",
                      "models": [{"name": "other"}]}],
        "models": [{"name": "public", "aliases": ["nick"],
                    "candidates": [{"backend": "v1", "model": "served"},
                                   {"backend": "o1", "model": "other"}]}]}), env={})
    content = [{"type": "text", "text": "hi"}, AUDIO_URL]
    body = orjson.dumps({"model": "nick", "messages": [{"role": "user", "content": content}]})
    data = orjson.loads(body)
    d = route_request(rt.table, data, {})
    p = rt.planner.route(RequestView("POST", "/v1/chat/completions", {}, body, data), d)
    assert dict(p.set_headers) == {"x-ai-eg-model": "public"}
    assert p.work is None  # vLLM (the first candidate) takes audio_url as it is
    assert orjson.loads(p.body)["model"] == "public"
    content = [{"type": "text", "text": "hi"}, {"type": "input_image",
                                                  "image_url": data_url("image/png", text_image("x"))}]
    body = orjson.dumps({"model": "public", "messages": [{"role": "user", "content": content}]})
    data = orjson.loads(body)
    p = rt.planner.route(RequestView("POST", "/v1/chat/completions", {}, body, data),
                         route_request(rt.table, data, {}))
    assert p.work is not None and (p.work.backend, p.work.model) == ("v1", "public")


def test_a_request_for_another_api_is_translated_once_when_its_candidates_are_alike() -> None:
    """Messages for chat-only candidates alike: the route stage translates the body (judged
    cluster: the attempt stage translates the answer back, from the echo in the hand-off; for
    one candidate, not judged, the route stage translates the answer back itself);
    candidates spoken to in different APIs, or an echo too large to hand off, leave it to
    each attempt."""
    rt = Runtime.build(parse_config({"backends": [
        {"name": "c1", "preset": "vllm", "url": "http://127.0.0.1:8001/v1", "apis": ["chat"],
         "models": [{"name": "m"}]},
        {"name": "c2", "preset": "vllm", "url": "http://127.0.0.1:8002/v1", "apis": ["chat"],
         "models": [{"name": "m"}]},
        {"name": "n1", "preset": "vllm", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "m"}]}],
        "models": [{"name": "alike", "candidates": [{"backend": "c1", "model": "m"},
                                                    {"backend": "c2", "model": "m"}]},
                   {"name": "mixed", "candidates": [{"backend": "c1", "model": "m"},
                                                    {"backend": "n1", "model": "m"}]},
                   {"name": "one", "candidates": [{"backend": "c1", "model": "m"}]}]}), env={})
    messages, responses = BY_PATH["/v1/messages"], BY_PATH["/v1/responses"]

    def route(model: str, path: str = "/v1/messages", **extra: Any) -> RoutePlan:
        data = {"model": model, **extra} if path == "/v1/responses" else {
            "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            **extra}
        body = orjson.dumps(data)
        d = route_request(rt.table, data, {}, endpoint=BY_PATH[path])
        return rt.planner.route(RequestView("POST", path, {}, body, data), d)

    p = route("alike")
    assert p.kind == "judged" and p.work is not None and p.work.translated
    assert dict(p.set_headers)[":path"] == "/v1/chat/completions"
    assert dict(p.set_headers)["accept-encoding"] == "identity"
    assert handoff(p).echo == {"model": "alike"} and handoff(p).endpoint is messages
    assert route("mixed").kind == "per_attempt"
    # One candidate, nothing judged: the route stage translates the answer back too (its own
    # stream sees the response), no attempt stage; a forced tool is judged per attempt.
    p = route("one")
    assert p.kind == "direct" and p.answer_echo == {"model": "one"} and p.work is not None
    assert p.metadata[Meta.ENDPOINT] == "/v1/messages"  # (Envoy's errors in its envelope)
    assert rt.planner.watches_answers(messages) and not rt.planner.watches_answers(
        BY_PATH["/v1/chat/completions"])
    native = Runtime.build(parse_config({"backends": [  # (every backend speaks Messages)
        {"name": "n1", "preset": "vllm", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "m"}]}]}), env={})
    assert not native.planner.watches_answers(messages)
    forced = route("one", tools=[{"name": "t", "input_schema": {"type": "object"}}],
                   tool_choice={"type": "tool", "name": "t"})
    assert forced.kind == "judged" and forced.answer_echo is None
    assert p.answer_echo is not None and route("alike").answer_echo is None
    assert route("alike", system="x" * 10_000).kind == "judged"  # (Messages echo the model)
    p = route("alike", "/v1/responses", input="hi", instructions="be brief")
    assert p.kind == "judged" and handoff(p).endpoint is responses
    assert handoff(p).echo == {"model": "alike", "instructions": "be brief"}
    assert route("alike", "/v1/responses", input="hi",
                 instructions="x" * 9000).kind == "per_attempt"
