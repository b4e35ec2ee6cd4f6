"""Through the gateway: a real Envoy and the service in front of the real vLLM. What we promise
about routing, streaming, parts, forced tools, discovery and failover, held against a real
server's answers (a random model: its tool calls are not valid, which is the point). The last
test stops the real server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import orjson
import yaml
from tests.e2e.conftest import received, wait_line

from extproc_dev.stack import Stack

from .cases import PNG, WAV, WEATHER, chat, part
from .conftest import REPORT
from .real_vllm import MAX_MODEL_LEN, SERVED_NAME, Server


@contextmanager
def reported(case: str) -> Iterator[list[str]]:
    """Record the case's result for the report: what ``notes`` says, or FAILED."""
    notes: list[str] = []
    try:
        yield notes
    except BaseException as exc:
        REPORT.gateway[case] = (f"FAILED: {str(exc).splitlines()[0][:150]}", "")
        raise
    REPORT.gateway[case] = ("; ".join(notes), "")


def post(stack: Stack, body: dict, **kw) -> httpx.Response:
    return httpx.post(stack.envoy_url + "/v1/chat/completions", json=body, timeout=120, **kw)


def test_routes_by_model_and_rewrites_the_name(gateway: Stack, real_vllm: Server) -> None:
    with reported("routing by model, name rewritten") as notes:
        direct = httpx.post(real_vllm.url + "/v1/chat/completions",
                            json={**chat(), "model": "coder"}, timeout=60)
        assert direct.status_code == 404  # the real server knows only its own name
        c = openai.OpenAI(base_url=gateway.envoy_url + "/v1", api_key="x", max_retries=0)
        raw = c.chat.completions.with_raw_response.create(
            model="coder", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        answer = raw.parse()
        assert raw.headers["x-extproc-backend"] == "real"
        assert raw.headers["x-extproc-model"] == SERVED_NAME and answer.model == SERVED_NAME
        notes.append(f"'coder' -> real/{SERVED_NAME}: 200 (direct 'coder': 404)")


def test_a_stream_passes_through_live_and_unchanged(gateway: Stack, real_vllm: Server) -> None:
    with reported("streaming passes through") as notes:
        # Enough tokens that generating them takes a measurable time (about 1 s here).
        body = {**chat(max_tokens=400, temperature=0, stream=True), "ignore_eos": True}

        def events(url: str, model: str) -> tuple[list[str], list[float]]:
            out, at = [], []
            t0 = time.monotonic()
            with httpx.stream("POST", url + "/v1/chat/completions",
                              json={**body, "model": model}, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out.append(line[6:])
                        at.append(time.monotonic() - t0)
            return out, at

        direct, direct_at = events(real_vllm.url, SERVED_NAME)
        through, at = events(gateway.envoy_url, "tiny")

        def text(evs: list[str]) -> str:
            chunks = [orjson.loads(e) for e in evs if e != "[DONE]"]
            return "".join((c["choices"][0]["delta"].get("content") or "")
                           for c in chunks if c.get("choices"))

        assert through[-1] == "[DONE]" and len(through) == len(direct) > 100
        assert text(through) == text(direct)  # greedy decoding: the same tokens
        # Live: events arrive spread over the generation as they do direct, not held to its end.
        spread, direct_spread = at[-1] - at[0], direct_at[-1] - direct_at[0]
        assert direct_spread > 0.1, f"generation too quick to tell ({direct_spread:.3f} s)"
        assert spread > 0.5 * direct_spread, (spread, direct_spread)
        notes.append(f"{len(through)} events over {spread * 1000:.0f} ms (direct: "
                     f"{direct_spread * 1000:.0f} ms), first after {at[0] * 1000:.0f} ms; "
                     "text identical to the direct stream")


def test_an_image_for_the_text_only_model_is_described(gateway: Stack,
                                                       real_vllm: Server) -> None:
    with reported("image to the text-only real model") as notes:
        body = chat(part({"type": "image_url",
                          "image_url": {"url": f"data:image/png;base64,{PNG}"}}))
        direct = httpx.post(real_vllm.url + "/v1/chat/completions", json=body, timeout=60)
        assert direct.status_code == 400
        r = post(gateway, {**body, "model": "tiny"})
        assert r.status_code == 200, r.text
        assert r.headers["x-extproc-backend"] == "real"
        assert r.headers["x-extproc-vision"].startswith("substituted=1")
        assert received(gateway, "aux"), "the aux vision model was not asked"
        notes.append(f"direct: {direct.status_code}; gateway: 200 with the image described "
                     "by the aux vision model")


def test_audio_for_the_text_only_model_is_an_exact_400(gateway: Stack,
                                                       real_vllm: Server) -> None:
    with reported("audio to the text-only real model") as notes:
        body = chat(part({"type": "input_audio", "input_audio": {"data": WAV,
                                                                 "format": "wav"}}))
        direct = httpx.post(real_vllm.url + "/v1/chat/completions", json=body, timeout=60)
        r = post(gateway, {**body, "model": "tiny"})
        err = r.json()["error"]
        assert direct.status_code == 400 and r.status_code == 400
        assert err["code"] == "unsupported_capability" and "audio" in err["message"]
        assert "param" in err
        notes.append(f"direct: 400 {direct.json()['error']['message'][:40]!r}; gateway: 400 "
                     f"{err['code']} before any backend is called")


def test_a_forced_tool_call_the_real_model_botches_is_retried(gateway: Stack) -> None:
    with reported("forced tool call retried") as notes:
        r = post(gateway, {**chat(tools=WEATHER, tool_choice="required", max_tokens=16),
                           "model": "tiny-then-spare"})
        assert r.status_code == 200, r.text
        calls = r.json()["choices"][0]["message"].get("tool_calls")
        assert r.headers["x-extproc-backend"] == "spare" and calls
        assert r.headers["x-extproc-attempts"] == "2"
        record = wait_line(gateway, "service", r.headers["x-request-id"], "routing.decision")
        (retry,) = record["capability_retries"]
        assert record["attempts"][0]["backend"] == "real" and retry["backend"] == "real"
        notes.append(f"real answered 200 without a valid tool call ({retry['reason']}); "
                     "retried on spare: 200 with the call")


def test_discovery_reads_the_real_server(gateway: Stack, real_vllm: Server, tmp_path) -> None:
    with reported("discovery and extproc init") as notes:
        models = {m["id"]: m for m in
                  httpx.get(gateway.envoy_url + "/v1/models", timeout=10).json()["data"]}
        deadline = time.monotonic() + 60
        while models["tiny"]["candidates"][0].get("context_length") != MAX_MODEL_LEN:
            assert time.monotonic() < deadline, models["tiny"]
            time.sleep(1)
            models = {m["id"]: m for m in
                      httpx.get(gateway.envoy_url + "/v1/models", timeout=10).json()["data"]}
        out = tmp_path / "starter.yaml"
        subprocess.run([sys.executable, "-m", "extproc.cli", "init", "--backend",
                        real_vllm.url + "/v1", "--out", str(out)], check=True, timeout=60)
        starter = yaml.safe_load(out.read_text())
        backend = starter["backends"][0]
        assert backend["preset"] == "vllm"
        assert [m["name"] for m in backend["models"]] == [SERVED_NAME]
        check = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(out)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        notes.append(f"context_length {MAX_MODEL_LEN} read from max_model_len; extproc init "
                     "detected vllm and its model; extproc check accepts it")


def test_failover_when_the_real_server_dies_mid_run(gateway: Stack, real_vllm: Server) -> None:
    """Last: stops the real server while requests are in flight; none may be lost."""
    with reported("failover, real server killed mid-run") as notes:
        sent, answered, by = 0, 0, {"real": 0, "spare": 0}
        lock = threading.Lock()
        stop_at = 12

        def client() -> None:
            nonlocal sent, answered
            with httpx.Client(timeout=120) as c:
                for _ in range(10):
                    with lock:
                        sent += 1
                    r = c.post(gateway.envoy_url + "/v1/chat/completions",
                               json={**chat(max_tokens=4), "model": "tiny-then-spare"})
                    with lock:
                        if r.status_code == 200:
                            answered += 1
                            by[r.headers["x-extproc-backend"]] += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while sent < stop_at:
            time.sleep(0.01)
        real_vllm.stop(sig=9)  # the server and its engine, at once
        for t in threads:
            t.join(300)
        assert sent == 40 and answered == sent, (sent, answered, by)
        assert by["real"] > 0 and by["spare"] > 0, by
        notes.append(f"sent {sent}, answered {answered}, lost {sent - answered} (real "
                     f"{by['real']}, spare {by['spare']})")

