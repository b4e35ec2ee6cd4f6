"""End to end through a real Envoy, with the official openai SDK as the client."""

from __future__ import annotations

import base64
import os
import socket
import time

import httpx
import openai
import orjson
import pytest

from extproc_dev.stack import Stack

from .conftest import BACKEND_KEY, read_answer, received, reset


def client(stack: Stack, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="client-key-abc",
                         max_retries=0, timeout=30, **kw)


def chat(stack: Stack, model: str, **kw: object):
    return client(stack).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], **kw)


def test_two_models_reach_two_backends_with_served_names(routing_stack: Stack) -> None:
    for b in ("vllm-a", "llama-b"):
        reset(routing_stack, b)
    r1 = chat(routing_stack, "qwen3-coder-25b")
    r2 = chat(routing_stack, "coder-40b")
    assert r1.headers["x-extproc-backend"] == "vllm-a"
    assert r2.headers["x-extproc-backend"] == "llama-b"
    assert r2.headers["x-extproc-model"] == "coder-40b-q5"
    assert r1.parse().choices[0].message.content == "Hello from vllm-a serving qwen3-coder-25b."
    (got_a,) = received(routing_stack, "vllm-a")
    (got_b,) = received(routing_stack, "llama-b")
    assert got_a["json"]["model"] == "qwen3-coder-25b"
    assert got_b["json"]["model"] == "coder-40b-q5"  # rewritten to the backend's own name
    assert got_b["json"]["messages"] == [{"role": "user", "content": "hello"}]


def test_body_arriving_in_pieces_is_rewritten_whole(routing_stack: Stack) -> None:
    """A body that reaches Envoy in pieces, the first well before the rest: the backend gets
    exactly the rewritten body, once."""
    reset(routing_stack, "llama-b")
    body = orjson.dumps({"model": "coder-40b", "messages": [{"role": "user", "content": "hi"}]})
    host, port = routing_stack.envoy_url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                     + body[:12])
        time.sleep(0.2)  # Envoy has the first piece well before the rest
        sock.sendall(body[12:])
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200")
    (got,) = received(routing_stack, "llama-b")
    assert got["json"] == {"model": "coder-40b-q5",
                           "messages": [{"role": "user", "content": "hi"}]}


def test_alias_and_default_model(routing_stack: Stack) -> None:
    reset(routing_stack, "vllm-a")
    r = chat(routing_stack, "coder")
    assert r.headers["x-extproc-backend"] == "vllm-a"
    r = httpx.post(routing_stack.envoy_url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "no model"}]})
    assert r.status_code == 200 and r.headers["x-extproc-model"] == "qwen3-coder-25b"
    models = [x["json"]["model"] for x in received(routing_stack, "vllm-a")]
    assert models == ["qwen3-coder-25b", "qwen3-coder-25b"]


def test_unknown_model_404_lists_models(routing_stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        chat(routing_stack, "gpt-9")
    err = exc.value.body
    assert exc.value.status_code == 404
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-9" in err["message"]
    for name in ("qwen3-coder-25b", "coder", "coder-40b", "shared", "failover"):
        assert name in err["available_models"]


def test_models_endpoint_lists_config(routing_stack: Stack) -> None:
    ids = {m.id for m in client(routing_stack).models.list()}
    assert {"qwen3-coder-25b", "coder", "coder-40b", "shared", "failover"} <= ids
    assert "dead" not in ids
    r = httpx.get(routing_stack.envoy_url + "/v1/models/coder")
    assert r.status_code == 200 and r.json()["alias_of"] == "qwen3-coder-25b"


def test_forged_internal_headers_change_nothing(routing_stack: Stack) -> None:
    reset(routing_stack, "llama-b")
    forged = {"x-extproc-cluster": "extproc_service", "x-extproc-retry": "1",
              "x-envoy-max-retries": "9", "x-extproc-backend": "llama-b"}
    r = client(routing_stack, default_headers=forged).chat.completions.with_raw_response.create(
        model="qwen3-coder-25b", messages=[{"role": "user", "content": "hi"}])
    assert r.headers["x-extproc-backend"] == "vllm-a"
    assert received(routing_stack, "llama-b") == []
    # A request the route stage refuses cannot be steered anywhere by the header either.
    r2 = httpx.post(routing_stack.envoy_url + "/v1/chat/completions", content=b"[]",
                    headers={"x-extproc-cluster": "llm_backends"})
    assert r2.status_code == 400 and r2.json()["error"]["code"] == "invalid_type"


def test_backend_credentials_injected_client_key_not_forwarded(routing_stack: Stack) -> None:
    reset(routing_stack, "llama-b")
    reset(routing_stack, "vllm-a")
    assert chat(routing_stack, "coder-40b").status_code == 200  # emulator demands its key
    assert chat(routing_stack, "coder").status_code == 200
    (b,) = received(routing_stack, "llama-b")
    (a,) = received(routing_stack, "vllm-a")
    assert b["headers"]["authorization"] == f"Bearer {BACKEND_KEY}"
    assert "authorization" not in a["headers"]  # no key of its own: the client's is dropped
    for rec in (a, b):
        assert "x-extproc-cluster" not in rec["headers"]
        assert "client-key-abc" not in orjson.dumps(rec["headers"]).decode()


def test_dead_first_candidate_fails_over(routing_stack: Stack) -> None:
    reset(routing_stack, "vllm-c")
    r = chat(routing_stack, "failover")
    assert r.headers["x-extproc-backend"] == "vllm-c"
    assert r.headers["x-extproc-attempts"] == "2"
    assert [x["json"]["model"] for x in received(routing_stack, "vllm-c")] == ["big-1"]


def test_5xx_fails_over_with_next_candidates_model_name(routing_stack: Stack) -> None:
    for b in ("vllm-a", "vllm-c"):
        reset(routing_stack, b)
    httpx.post(routing_stack.backend_url("vllm-c") + "/_emulator/behaviour",
               json={"fail_status": 503, "fail_times": 1})
    r = chat(routing_stack, "shared")
    assert r.headers["x-extproc-backend"] == "vllm-a"
    assert r.headers["x-extproc-model"] == "shared-7b"
    assert [x["json"]["model"] for x in received(routing_stack, "vllm-c")] == ["shared-7b-awq"]
    assert [x["json"]["model"] for x in received(routing_stack, "vllm-a")] == ["shared-7b"]


def test_all_candidates_failing_gives_json_error(routing_stack: Stack) -> None:
    httpx.post(routing_stack.backend_url("vllm-c") + "/_emulator/behaviour",
               json={"fail_status": 500, "fail_times": 5})
    try:
        r = httpx.post(routing_stack.envoy_url + "/v1/chat/completions",
                       json={"model": "failover", "messages": [{"role": "user", "content": "x"}]})
    finally:
        reset(routing_stack, "vllm-c")
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-extproc-attempts"] == "2"


def test_five_megabyte_body_passes_intact(routing_stack: Stack) -> None:
    reset(routing_stack, "llama-b")
    blob = base64.b64encode(os.urandom(3_900_000)).decode()
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{blob}"}}]
    body = {"model": "coder-40b", "messages": [{"role": "user", "content": content}]}
    raw = orjson.dumps(body)
    assert len(raw) > 5_000_000
    r = client(routing_stack).chat.completions.with_raw_response.create(**body)
    assert r.headers["x-extproc-backend"] == "llama-b"
    (got,) = received(routing_stack, "llama-b")
    assert got["json"]["messages"] == body["messages"]
    assert got["json"]["model"] == "coder-40b-q5"
    assert got["body_bytes"] == len(raw) - len(b"coder-40b") + len(b"coder-40b-q5")


def test_embeddings_and_completions_are_routed(routing_stack: Stack) -> None:
    c = client(routing_stack)
    e = c.embeddings.with_raw_response.create(model="coder-40b", input="x")
    assert e.headers["x-extproc-backend"] == "llama-b"
    t = c.completions.with_raw_response.create(model="coder", prompt="x")
    assert t.headers["x-extproc-backend"] == "vllm-a"


def test_bad_requests_get_json_errors(routing_stack: Stack) -> None:
    u = routing_stack.envoy_url
    r = httpx.post(u + "/v1/chat/completions", content=b'{"model": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(u + "/v1/chat/completions", json={"model": 42, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(u + "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(u + "/v1/unknown", json={"model": "coder"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_path"


def test_decision_record_logged(routing_stack: Stack) -> None:
    r = chat(routing_stack, "failover")
    rid = r.headers["x-request-id"]
    lines: list[dict] = []
    deadline = time.monotonic() + 5  # written when the route-stage stream closes
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = [orjson.loads(x) for x in routing_stack.log_path("service").read_text()
                 .splitlines() if rid in x and '"routing.decision"' in x]
    assert len(lines) == 1
    rec = lines[0]
    assert rec["model_requested"] == "failover" and rec["resolution"] == "exact"
    assert [c["backend"] for c in rec["candidates"]] == ["dead", "vllm-c"]
    assert rec["attempts"][0]["backend"] == "dead" and rec["attempts"][0]["result"]
    assert rec["attempts"][1]["backend"] == "vllm-c" and rec["attempts"][1]["status"] == 200
    assert rec["outcome"] == "ok"


def test_unreachable_backend_gives_json_503_naming_model(routing_stack: Stack) -> None:
    r = httpx.post(routing_stack.envoy_url + "/v1/chat/completions",
                   json={"model": "only-dead", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["model"] == "only-dead" and "only-dead" in err["message"]
    assert err["type"] == "upstream_error" and err["request_id"] == r.headers["x-request-id"]


def test_concurrent_large_bodies_do_not_crash_envoy(routing_stack: Stack) -> None:
    """Regression: with the gRPC cluster's default 1 MiB buffer limit, concurrent multi-MB
    bodies made Envoy 1.40 segfault in the attempt-stage (upstream) ext_proc filter."""
    from concurrent.futures import ThreadPoolExecutor

    blob = base64.b64encode(os.urandom(3_000_000)).decode()
    body = orjson.dumps({"model": "coder-40b", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{blob}"}}]}]})

    def send(_: int) -> int:
        return httpx.post(routing_stack.envoy_url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(send, range(18)))
    assert statuses == [200] * 18
    assert routing_stack.procs["envoy"].poll() is None


def envoy_stat(stack: Stack, name: str) -> int:
    admin = f"http://127.0.0.1:{stack.config.envoy.admin_port}/stats?filter=^{name}$"
    line = httpx.get(admin).text.strip()
    return int(line.rsplit(":", 1)[1]) if line else 0


def test_requests_with_nothing_per_backend_skip_the_attempt_stage(routing_stack: Stack) -> None:
    pool = "cluster.llm_backends.upstream_rq_total"

    def direct() -> int:  # (the compiled fast lane's cluster is its own, also without one)
        return sum(envoy_stat(routing_stack, f"cluster.{c}.upstream_rq_total")
                   for c in ("llm_backends_direct", "llm_backends_fast"))

    d0, p0 = direct(), envoy_stat(routing_stack, pool)
    for b in ("vllm-a", "vllm-c"):
        reset(routing_stack, b)
    r1 = chat(routing_stack, "coder")     # one candidate: prepared whole by the route stage
    r2 = chat(routing_stack, "shared")    # two candidates with different names: per attempt
    assert r1.headers["x-extproc-backend"] == "vllm-a"   # named without an attempt stage
    assert r2.headers["x-extproc-backend"] == "vllm-c"
    assert direct() == d0 + 1
    assert envoy_stat(routing_stack, pool) == p0 + 1
    for b in ("vllm-a", "vllm-c"):
        (got,) = received(routing_stack, b)
        leaked = [h for h in got["headers"] if h.startswith(("x-extproc", "x-envoy-max"))]
        assert leaked == [], (b, leaked)
