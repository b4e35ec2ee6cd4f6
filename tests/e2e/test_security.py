"""Hostile clients through a real Envoy: client API keys, forged headers, slow and oversized
bodies, URL parts aimed at private addresses, and a bounded fuzz. None reaches anything it
should not, and every answer is JSON. And backends that send our own response headers."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from extproc_dev.stack import Stack

from .conftest import (
    BACKEND_KEY,
    fetch_refusal,
    read_answer,
    received,
    reset,
    stack_config,
    start_stack,
    wait_line,
)

CLIENT_KEY = "ck-team-a-0123456789"


@pytest.fixture(scope="module")
def sstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("security")
    keys = tmp / "keys.yaml"
    keys.write_text("team-b: ck-team-b-from-file\n")
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1"],
                   "api_key_env": "E2E_BACKEND_KEY"},
                  {"name": "o", "preset": "ollama", "models": ["m-o"]}],
        models=[{"name": "pub", "candidates": [{"backend": "a", "model": "m1"}]},
                {"name": "olla", "candidates": [{"backend": "o", "model": "m-o"}]}],
        client_auth={"keys": [{"client": "team-a", "key": CLIENT_KEY}],
                     "keys_file": str(keys)},
        hints={"policies": {"a-only": {"require_tags": []}},
               "access": [{"clients": ["team-a"], "allow": ["intent", "backend"]}]},
        envoy={"request_timeout_s": 2, "max_body_bytes": 2 * 1024 * 1024},
        service={"max_part_bytes": 64 * 1024})
    stack = start_stack(tmp, cfg)
    yield stack
    stack.stop()


def post(stack: Stack, key: str | None = CLIENT_KEY, headers: dict | None = None,
         **body: object) -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.post(stack.envoy_url + "/v1/chat/completions", headers=h, timeout=15,
                      json={"model": "pub", "messages": [{"role": "user", "content": "hi"}],
                            **body})


def test_no_key_or_wrong_key_is_401_before_the_service(sstack: Stack) -> None:
    reset(sstack, "a")
    for key, code in ((None, "missing_api_key"), ("ck-wrong", "unknown_api_key")):
        r = post(sstack, key)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == code
    assert received(sstack, "a") == []
    assert post(sstack, "ck-team-b-from-file").status_code == 200  # keys from a file


def test_forged_client_id_is_overwritten_and_keys_never_forwarded(sstack: Stack) -> None:
    reset(sstack, "a")
    # team-b forges team-a's id to use a hint only team-a may use: Envoy overwrites the id.
    r = post(sstack, "ck-team-b-from-file", headers={"x-client-id": "team-a"},
             metadata={"route_backend": "a"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "hint_not_allowed"
    assert post(sstack, CLIENT_KEY, metadata={"route_backend": "a"}).status_code == 200
    (got,) = received(sstack, "a")
    assert got["headers"]["authorization"] == f"Bearer {BACKEND_KEY}"  # its own key only
    assert CLIENT_KEY not in orjson.dumps(got).decode()


def test_keys_never_appear_in_logs_or_responses(sstack: Stack) -> None:
    r = post(sstack)
    assert BACKEND_KEY not in r.text and BACKEND_KEY not in str(r.headers)
    time.sleep(1.5)  # access log flush
    for log in ("service", "envoy"):
        text = sstack.log_path(log).read_text()
        assert CLIENT_KEY not in text and "ck-team-b-from-file" not in text, log
        assert BACKEND_KEY not in text, log


def test_client_x_envoy_headers_have_no_effect(sstack: Stack) -> None:
    reset(sstack, "a")
    httpx.post(sstack.backend_url("a") + "/_emulator/behaviour", json={"delay_s": 0.3})
    try:
        r = post(sstack, headers={"x-envoy-upstream-rq-timeout-ms": "1",
                                  "x-envoy-upstream-rq-per-try-timeout-ms": "1",
                                  "x-envoy-retry-on": "5xx", "x-envoy-max-retries": "9"})
        (got,) = received(sstack, "a")
    finally:
        reset(sstack, "a")
    assert r.status_code == 200  # a 1 ms timeout from the client was not honoured
    assert not [h for h in got["headers"] if h.startswith("x-envoy-retry")]


def test_forged_internal_headers(sstack: Stack) -> None:
    r = post(sstack, headers={"x-extproc-cluster": "extproc_service",
                              "x-extproc-stage": "attempt"})
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "a"


def test_body_over_the_limit_is_413_json(sstack: Stack) -> None:
    r = post(sstack, messages=[{"role": "user", "content": "x" * (3 * 1024 * 1024)}])
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "gateway_error"


def test_inline_part_over_the_limit_is_413_naming_it(sstack: Stack) -> None:
    blob = "A" * (100 * 1024)
    r = post(sstack, messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{blob}"}}]}])
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "part_too_large" and err["param"] == "messages[0].content[1]"


def test_slowloris_body_is_cut_off_with_json(sstack: Stack) -> None:
    reset(sstack, "a")
    host, port = sstack.envoy_url.split("//")[1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                  b"application/json\r\nauthorization: Bearer " + CLIENT_KEY.encode() +
                  b"\r\ncontent-length: 100000\r\n\r\n{\"model\": ")
        answer = read_answer(s, max_s=8)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"type":"gateway_error"' in answer
    assert time.monotonic() - t0 < 6
    assert received(sstack, "a") == []


@pytest.mark.parametrize("url", [
    "https://10.0.0.1/x.png",            # private (refused before any packet is sent)
    "https://192.168.1.1/x.png",
    "https://169.254.169.254/latest/meta-data/iam",
    "https://localhost:9/x.png",         # a name that resolves to loopback (rebinding-style)
    "https://[::ffff:127.0.0.1]:9/x.png",
    "http://127.0.0.1:9/x.png",          # plain http is refused outright
])
def test_url_parts_aimed_inside_are_refused(url: str) -> None:
    exc = fetch_refusal(url)
    assert exc.reply.status == 400 and exc.reply.code == "url_refused"


def test_bounded_fuzz_through_envoy(sstack: Stack) -> None:
    """Random near-valid bodies: each answer is a correct forward or a 4xx JSON error."""
    rng = random.Random(1234)
    pieces = [b'{"model": "pub"', b'"messages": [', b'{"role": "user", "content": "hi"}',
              b'{"type": "image_url", "image_url": 5}', b'"metadata": {"route_intent": 1}',
              b'"tools": [{}]', b'"tool_choice": "required"', b"null", b"[]", b"{}", b"\xff",
              b'"content": [{"type": "input_audio", "input_audio": {"data": "@@", '
              b'"format": "wav"}}]', b"]", b"}", b",", b":", b'"', b"1e999"]
    sent = answered = 0
    with httpx.Client(timeout=15) as client:
        for _ in range(150):
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
            if rng.random() < 0.3:
                body = b'{"model": "pub", "messages": [{"role": "user", "content": "hi"}], ' \
                    + body + b"}"
            sent += 1
            r = client.post(sstack.envoy_url + "/v1/chat/completions", content=body,
                            headers={"authorization": f"Bearer {CLIENT_KEY}"})
            assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["message"] and err["code"], r.text
            answered += 1
    print(f"fuzz through Envoy: sent {sent}, answered {answered}, lost {sent - answered}")
    assert answered == sent


@pytest.mark.parametrize("lane", ["lua", "compiled"])
def test_backend_copies_of_our_response_headers_are_dropped(tmp_path, lane: str) -> None:
    """A backend answering with x-extproc-* headers of its own (which backend it is, parts
    converted, a retry trigger...) changes nothing the client or the decision record sees, on
    every plan: the fast lane (either; the compiled one tags and strips itself), direct,
    judged (responses only) and per attempt."""
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1", "same"]},
                  {"name": "b", "preset": "vllm", "models": ["m2", "same"]}],
        models=[{"name": "solo", "aliases": ["solo-alias"],
                 "candidates": [{"backend": "a", "model": "m1"}]},
                {"name": "pair", "candidates": [{"backend": "a", "model": "same"},
                                                {"backend": "b", "model": "same"}]},
                {"name": "two", "candidates": [{"backend": "a", "model": "m1"},
                                               {"backend": "b", "model": "m2"}]}],
        envoy={"fast_lane_compiled": lane == "compiled"})
    stack = start_stack(tmp_path, cfg)
    spoof = {"x-extproc-backend": "evil", "x-extproc-model": "evil",
             "x-extproc-converted-parts": "99", "x-extproc-vision": "spoofed",
             "x-extproc-unmet-capability": "spoofed", "x-extproc-warnings": "spoofed",
             "x-extproc-retry": "spoofed", "x-extproc-attempts": "7"}
    try:
        httpx.post(stack.backend_url("a") + "/_emulator/behaviour", json={"headers": spoof})
        # (solo with a response_format: the ext_proc path, one candidate: direct)
        for model, extra, plan, served in (
                ("solo", {}, "fast", "m1"), ("solo-alias", {}, "fast", "m1"),
                ("solo", {"response_format": {"type": "text"}}, "direct", "m1"),
                ("pair", {}, "judged", "same"), ("two", {}, "per_attempt", "m1")):
            r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
            assert r.status_code == 200, r.text
            assert (r.headers["x-extproc-backend"], r.headers["x-extproc-model"]) == \
                ("a", served), model
            assert r.headers["x-extproc-attempts"] == "1", model  # no retry was triggered
            for name in ("x-extproc-converted-parts", "x-extproc-vision",
                         "x-extproc-unmet-capability", "x-extproc-warnings", "x-extproc-retry"):
                assert name not in r.headers, (model, name)
            rec = wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')
            assert rec["plan"] == plan
            assert [(x["backend"], x["model"]) for x in rec["attempts"]] == [("a", served)]
            assert (rec["converted_parts"], rec["vision"], rec["unmet_capability"]) == \
                (0, None, None)
        # More headers than the compiled lane reads at once (MAX_HEADERS, 96; Envoy takes
        # 100): its copies still go
        padding = {f"x-pad-{i}": "1" for i in range(90)}
        httpx.post(stack.backend_url("a") + "/_emulator/behaviour",
                   json={"headers": {**spoof, **padding}})
        r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
            "model": "solo", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and "x-pad-1" in r.headers, r.text
        assert {h for h in r.headers if h.startswith("x-extproc-")} == \
            {"x-extproc-backend", "x-extproc-model", "x-extproc-attempts"}
        assert (r.headers["x-extproc-backend"], r.headers["x-extproc-attempts"]) == ("a", "1")
    finally:
        stack.stop()


@pytest.mark.parametrize(("ip", "allowed"), [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True), ("2002:808:808::", True),
    ("127.0.0.1", False), ("::1", False), ("169.254.169.254", False), ("fe80::1", False),
    ("::ffff:127.0.0.1", False),            # IPv4-mapped
    ("64:ff9b::7f00:1", False),             # NAT64 to loopback
    ("64:ff9b:1::a9fe:a9fe", False),        # local-use NAT64 to the metadata service
    ("2002:7f00:1::", False),               # 6to4 of loopback
    ("2002:a9fe:a9fe::1", False),           # 6to4 of the metadata service
    ("::127.0.0.1", False),                 # IPv4-compatible
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo to 127.0.0.1
])
def test_ipv6_forms_of_inside_addresses_are_refused(ip: str, allowed: bool) -> None:
    from extproc.effects.fetch import FetchPolicy, address_allowed

    assert address_allowed(ip, FetchPolicy(), "h") is allowed
