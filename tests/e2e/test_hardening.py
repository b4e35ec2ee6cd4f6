"""Hostile requests and misbehaving backends through a real Envoy (issue 15): each test is a
finding reproduced on the code before its fix, and fails with that fix reverted."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from extproc_dev.stack import Stack, free_port

from ..media import b64, clip
from .conftest import BACKEND_KEY, received, reset, stack_config, write_config

OTHER_KEY = "sk-other-backend-456"
SCHEMA_SECRET = "SECRET-FROM-THE-FETCHED-SCHEMA"
ALL = ("lazy", "good", "keyed", "custom", "open", "pathy", "llama", "trusting", "seer")


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pathy = free_port()
    cfg = stack_config(
        backends=[
            {"name": "lazy", "preset": "vllm",
             "models": [{"name": "lazy-m", "capabilities": ["tools", "json"]}]},
            {"name": "good", "preset": "vllm",
             "models": [{"name": "good-m", "capabilities": ["tools", "json"]}]},
            {"name": "keyed", "preset": "vllm", "models": ["m1"], "api_key_env": "E2E_BACKEND_KEY"},
            {"name": "custom", "preset": "vllm", "models": ["m1"], "api_key_env": "E2E_OTHER_KEY",
             "auth_header": "x-custom-key", "auth_scheme": ""},
            {"name": "open", "preset": "vllm", "models": ["m1"], "forward_client_auth": True},
            {"name": "pathy", "preset": "vllm", "models": ["m1"],
             "url": f"http://127.0.0.1:{pathy}/api/v1"},
            {"name": "llama", "preset": "llamacpp", "models": ["m-l"]},
            {"name": "trusting", "preset": "vllm", "models": ["m-t"],
             "parts": {"check_urls": False}},
            {"name": "seer", "preset": "vllm",
             "models": [{"name": "seer-m", "capabilities": ["vision"]}]},
        ],
        models=[
            {"name": "judged", "candidates": [{"backend": "lazy", "model": "lazy-m"},
                                              {"backend": "good", "model": "good-m"}]},
            {"name": "plain", "candidates": [{"backend": "good", "model": "good-m"}]},
            {"name": "leak-key", "candidates": [{"backend": "keyed", "model": "m1"},
                                                {"backend": "open", "model": "m1"}]},
            {"name": "leak-custom", "candidates": [{"backend": "custom", "model": "m1"},
                                                   {"backend": "open", "model": "m1"}]},
            {"name": "paths", "candidates": [{"backend": "pathy", "model": "m1"},
                                             {"backend": "open", "model": "m1"}]},
            {"name": "paths-back", "candidates": [{"backend": "open", "model": "m1"},
                                                  {"backend": "pathy", "model": "m1"}]},
            {"name": "audio", "candidates": [{"backend": "llama", "model": "m-l"}]},
            {"name": "good-m", "candidates": [{"backend": "good", "model": "good-m"}]},
            {"name": "trust", "candidates": [{"backend": "trusting", "model": "m-t"}]},
            {"name": "see", "candidates": [{"backend": "seer", "model": "seer-m"}]},
        ],
        fetch={"allow_http": True, "allow_hosts": ["127.0.0.2"]},
        default_model="good-m",
        hints={"propagate": {"x-user": "user"}},
        expose_backend_models=False,
        capability_routing={"judge_timeout_s": 1.0})
    tmp = tmp_path_factory.mktemp("hardening")
    stack = Stack(write_config(tmp, cfg), workdir=str(tmp),
                  env={"E2E_BACKEND_KEY": BACKEND_KEY, "E2E_OTHER_KEY": OTHER_KEY}).start()
    yield stack
    stack.stop()


@pytest.fixture(autouse=True)
def clean(hstack: Stack) -> None:
    for b in ALL:
        reset(hstack, b)


def behave(stack: Stack, backend: str, **behaviour: object) -> None:
    httpx.post(stack.backend_url(backend) + "/_emulator/behaviour", json=behaviour)


def chat(stack: Stack, model: str, timeout: float = 15, headers: dict | None = None,
         **body: object) -> httpx.Response:
    return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=timeout,
                      headers=headers or {}, json={
                          "model": model, "messages": [{"role": "user", "content": "hi"}],
                          **body})


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


class Listener:
    """A loopback TCP server that counts connections and answers each with a JSON schema
    document naming a secret (what a remote $ref would have fetched)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = orjson.dumps({"const": SCHEMA_SECRET})
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
            conn.close()

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- 1. the response judge

def test_judge_never_fetches_a_remote_ref_and_never_leaks_it(hstack: Stack) -> None:
    listener = Listener()
    try:
        behave(hstack, "lazy", content='{"city": "Oslo"}')
        r = chat(hstack, "judged", response_format=json_schema(
            {"$ref": f"http://127.0.0.1:{listener.port}/schema.json"}))
    finally:
        listener.close()
    assert listener.connections == 0  # no I/O the client chose
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "lazy"  # unjudged: the answer passes
    assert SCHEMA_SECRET not in str(r.headers) and SCHEMA_SECRET not in r.text
    assert "x-extproc-unmet-capability" not in r.headers


def test_judge_self_referencing_schema_is_unjudged_not_a_500(hstack: Stack) -> None:
    behave(hstack, "lazy", content='{"a": 1}')
    r = chat(hstack, "judged", response_format=json_schema({"$ref": "#"}))
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "lazy"


def test_judge_redos_pattern_is_bounded_and_blocks_no_one(hstack: Stack) -> None:
    """A catastrophic regex judged against the answer: bounded by the judge's time budget
    (the answer passes unjudged), and other clients are served meanwhile. On the old code the
    whole service froze for minutes."""
    behave(hstack, "lazy", content=orjson.dumps({"v": "a" * 34 + "!"}).decode())
    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^(a+)+$"}}}
    out: dict[str, object] = {}

    def hostile() -> None:
        t0 = time.monotonic()
        out["r"] = chat(hstack, "judged", timeout=20, response_format=json_schema(schema))
        out["s"] = time.monotonic() - t0

    t = threading.Thread(target=hostile)
    t.start()
    time.sleep(0.3)  # the judge is busy with it now
    others = []
    for _ in range(5):
        t0 = time.monotonic()
        assert chat(hstack, "plain", timeout=20).status_code == 200
        others.append(time.monotonic() - t0)
    t.join(timeout=30)
    r = out["r"]
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    assert r.headers["x-extproc-backend"] == "lazy"
    assert float(out["s"]) < 5  # type: ignore[arg-type]
    assert max(others) < 0.5, others


def test_judge_reasons_carry_no_model_output(hstack: Stack) -> None:
    """A failed schema check says which keyword failed, never the answer's text: reasons go to
    a response header and to the capability.retry / capability.unmet log lines."""
    secret = "MODEL-OUTPUT-7781"
    for b in ("lazy", "good"):
        behave(hstack, b, content=orjson.dumps({"city": secret}).decode())
    schema = {"type": "object", "properties": {"city": {"type": "number"}}}
    r = chat(hstack, "judged", response_format=json_schema(schema))
    assert r.status_code == 200
    assert r.headers["x-extproc-unmet-capability"] == \
        "json: does not match the schema (keyword 'type' failed)"
    assert r.headers["x-extproc-backend"] == "good"  # the first one was retried
    time.sleep(0.5)
    log = hstack.log_path("service").read_text()
    assert "capability.retry" in log and "capability.unmet" in log
    assert secret not in log


@pytest.mark.parametrize(("field", "value", "param"), [
    ("tool_choice", {"function": 5}, "tool_choice.function"),
    ("tool_choice", {"type": "function", "function": {"name": 7}}, "tool_choice.function.name"),
    ("tool_choice", 3, "tool_choice"),
    ("function_call", {"name": []}, "function_call.name"),
    ("response_format", "json", "response_format"),
    ("response_format", {"type": "json_schema", "json_schema": []}, "response_format.json_schema"),
])
def test_malformed_capability_fields_are_400_naming_them(hstack: Stack, field: str,
                                                         value: object, param: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = chat(hstack, "judged", tools=tools, **{field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert received(hstack, "lazy") == []


# ---------------------------------------------------------------- 5. client values in headers

def audio_part(fmt: str, data: bytes | None = None) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data or clip("wav")),
                                                   "format": fmt}}


@pytest.mark.parametrize("fmt", ["mp3\r\nset-cookie: session=attacker", "xyz", ""])
def test_unknown_audio_formats_are_400_and_inject_nothing(hstack: Stack, fmt: str) -> None:
    """The declared format used to reach the x-extproc-warnings header verbatim: a CRLF in it
    came back to the client as a separate set-cookie header."""
    r = chat(hstack, "audio", messages=[{"role": "user", "content": [audio_part(fmt)]}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == \
        ("invalid_value", "messages[0].content[0].input_audio.format")
    assert "set-cookie" not in r.headers
    assert received(hstack, "llama") == []


def test_declared_format_mismatch_still_warns_in_a_clean_header(hstack: Stack) -> None:
    r = chat(hstack, "audio", messages=[{"role": "user", "content": [audio_part("MP3")]}])
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-warnings"] == \
        "messages[0].content[0].input_audio.format: declared mp3, the bytes are wav"


def test_data_url_media_type_with_control_characters_is_400(hstack: Stack) -> None:
    url = "data:image/png\r\nx-evil: 1;base64," + b64(b"\x89PNG")
    r = chat(hstack, "plain", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_data_url"
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"


def test_propagated_metadata_with_control_characters_is_400_not_503(hstack: Stack) -> None:
    r = chat(hstack, "plain", metadata={"user": "alice\r\nx-evil: 1"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata.user"
    assert received(hstack, "good") == []
    assert chat(hstack, "plain", metadata={"user": "alice"}).status_code == 200
    (got,) = received(hstack, "good")
    assert got["headers"]["x-user"] == "alice" and "x-evil" not in got["headers"]


# ---------------------------------------------------------------- 2. credentials and paths

CLIENT = {"authorization": "Bearer client-key-1", "x-api-key": "client-key-2"}


@pytest.mark.parametrize(("model", "first", "header", "secret"), [
    ("leak-key", "keyed", "authorization", BACKEND_KEY),
    ("leak-custom", "custom", "x-custom-key", OTHER_KEY),
])
def test_failover_never_hands_a_backends_key_to_the_next(hstack: Stack, model: str, first: str,
                                                         header: str, secret: str) -> None:
    """The first candidate has a key of its own and answers 503; the next has none and
    forwards the client's. Envoy reuses the headers an upstream filter set for the retry: the
    second backend got the first one's key."""
    behave(hstack, first, fail_status=503, fail_times=-1)
    r = chat(hstack, model, headers=CLIENT)
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "open"
    (got,) = received(hstack, "open")
    assert secret not in str(got["headers"])
    assert got["headers"]["authorization"] == "Bearer client-key-1"  # the client's own
    assert got["headers"]["x-api-key"] == "client-key-2"
    (tried,) = received(hstack, first)
    assert tried["headers"][header].endswith(secret)  # it did get its own key
    assert "client-key" not in str(tried["headers"])  # and never the client's


@pytest.mark.parametrize(("model", "order"), [("paths", ("pathy", "open")),
                                              ("paths-back", ("open", "pathy"))])
def test_failover_sets_each_backends_path_from_the_clients(hstack: Stack, model: str,
                                                           order: tuple[str, str]) -> None:
    behave(hstack, order[0], fail_status=503, fail_times=-1)
    r = httpx.post(hstack.envoy_url + "/v1/chat/completions?trace=1", timeout=15, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == order[1], r.text
    expect = {"pathy": "/api/v1/chat/completions", "open": "/v1/chat/completions"}
    for backend in order:
        (got,) = received(hstack, backend)
        assert got["path"] == expect[backend], backend


@pytest.mark.parametrize("header", ["cookie", "proxy-authorization", "x-goog-api-key",
                                    "x-llm-intent", "x-extproc-backend"])
def test_denied_client_headers_never_reach_a_backend(hstack: Stack, header: str) -> None:
    for model, backend in (("plain", "good"), ("leak-key", "keyed"), ("judged", "lazy")):
        r = chat(hstack, model, headers={header: "forged-value"})
        assert r.status_code == 200, r.text
        (got,) = received(hstack, backend)
        assert header not in got["headers"] and "forged-value" not in str(got["headers"])
        reset(hstack, backend)


# ---------------------------------------------------------------- 6. one canonical model key

def top_level_keys(raw: str) -> list[str]:
    import json

    keys: list[list[str]] = []
    json.loads(raw, object_pairs_hook=lambda pairs: keys.append([k for k, _ in pairs]) or {})
    return keys[-1]  # the outermost object is built last


@pytest.mark.parametrize("raw", [
    '{"model": "good-m", "model": "good-m", "messages": []}',
    '{"model": "lazy-m", "model": "good-m", "messages": []}',
    '{"m\\u006fdel": "lazy-m", "model": "good-m", "messages": []}',
    '{"model": "lazy-m", "m\\u006fdel": "good-m", "messages": []}',
    '{"model": "plain", "m\\u006Fdel": "good-m", "messages": []}',
    '{"\\u006dodel": "judged", "model": "plain", "messages": []}',
    '{"model": null, "messages": []}',
])
def test_the_backend_gets_exactly_the_model_key_we_routed_on(hstack: Stack, raw: str) -> None:
    """Duplicate or escaped `model` keys reached the backend verbatim: a parser that takes
    the first value (or a Go server folding case) could serve a model the route never chose."""
    r = httpx.post(hstack.envoy_url + "/v1/chat/completions", timeout=15, content=raw.replace(
        '"messages": []', '"messages": [{"role": "user", "content": "hi"}]'),
        headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "good"
    (got,) = received(hstack, "good")
    keys = top_level_keys(got["raw"])
    assert [k for k in keys if k.casefold() == "model"] == ["model"], got["raw"]
    assert "\\u00" not in got["raw"]
    assert got["json"]["model"] == "good-m"


@pytest.mark.parametrize("key", ["Model", "MODEL", "mODEL"])
def test_a_case_variant_model_key_is_400(hstack: Stack, key: str) -> None:
    raw = '{"model": "plain", "' + key + '": "judged", "messages": []}'
    r = httpx.post(hstack.envoy_url + "/v1/chat/completions", timeout=15, content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == key


# ---------------------------------------------------------------- 10. compressed answers

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_gzipped_answer_is_judged_and_reaches_the_client_as_asked(hstack: Stack,
                                                                    stream: bool) -> None:
    """The openai SDK sends accept-encoding: gzip. A backend that compressed its prose answer
    to a forced tool_choice was never judged: the client got the prose."""
    import openai

    behave(hstack, "lazy", gzip=True, ignore_tools=True)
    behave(hstack, "good", gzip=True)
    client = openai.OpenAI(base_url=hstack.envoy_url + "/v1", api_key="k", max_retries=0,
                           timeout=30)
    # (A stream asks for its own usage: else the gateway asks for it, and for the stream
    # uncompressed; see test_usage.)
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    raw = client.chat.completions.with_raw_response.create(
        model="judged", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", stream=stream, **extra)
    assert raw.headers["x-extproc-backend"] == "good" and raw.headers["x-extproc-attempts"] == "2"
    assert raw.headers.get("content-encoding") == "gzip"  # as the client asked
    if stream:
        chunks = list(raw.parse())
        names = [tc.function.name for c in chunks if c.choices
                 for tc in (c.choices[0].delta.tool_calls or []) if tc.function and tc.function.name]
        assert names == ["get_weather"]
    else:
        assert raw.parse().choices[0].message.tool_calls[0].function.name == "get_weather"
    (lazy,) = received(hstack, "lazy")
    assert lazy["headers"]["accept-encoding"] == "gzip, deflate"


def test_a_gzipped_json_mode_answer_is_judged(hstack: Stack) -> None:
    behave(hstack, "lazy", gzip=True, prose_json=True)
    r = chat(hstack, "judged", headers={"accept-encoding": "gzip"},
             response_format={"type": "json_object"})
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "good", r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("{")


def test_judged_requests_ask_only_for_encodings_the_judge_reads(hstack: Stack) -> None:
    """br and zstd are dropped from what a judged request accepts (the judge could not read
    the answer); unjudged requests keep the client's header as it is."""
    ae = "br;q=1.0, gzip;q=0.8, zstd, *;q=0.1"
    r = chat(hstack, "judged", headers={"accept-encoding": ae}, tools=TOOLS,
             tool_choice="required")
    assert r.status_code == 200
    (got,) = received(hstack, "lazy")
    assert got["headers"]["accept-encoding"] == "gzip;q=0.8"
    assert chat(hstack, "plain", headers={"accept-encoding": ae}).status_code == 200
    (got,) = received(hstack, "good")
    assert got["headers"]["accept-encoding"] == ae


# ---------------------------------------------------------------- 3. budgets per request

def flac_silence(seconds: int, rate: int = 48000, channels: int = 2) -> bytes:
    import io

    import numpy as np
    import soundfile

    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", rate, channels, format="FLAC") as f:
        block = np.zeros((rate * 10, channels), dtype="int16")
        for _ in range(seconds // 10):
            f.write(block)
    return buf.getvalue()


def peak_rss_kb(stack: Stack) -> int:
    from pathlib import Path

    status = Path(f"/proc/{stack.procs['service'].pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_audio_decompression_bomb_is_413_before_decoding(hstack: Stack) -> None:
    """20 minutes of stereo silence: ~220 KB of FLAC, 230 MB decoded. The service's memory
    went from ~110 MB to ~2 GB, its event loop stopped for seconds, and the client got a
    gRPC error text."""
    bomb = flac_silence(1200)
    assert len(bomb) < 400_000
    before = peak_rss_kb(hstack)
    t0 = time.monotonic()
    r = chat(hstack, "audio", timeout=30, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(bomb), "format": "flac"}}]}])
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("audio_too_large", "messages[0].content[0]")
    assert "service.max_decoded_audio_bytes" in err["message"]
    assert time.monotonic() - t0 < 2
    assert peak_rss_kb(hstack) - before < 60_000  # nothing was decoded
    assert received(hstack, "llama") == []


class MediaServer:
    """Plain HTTP on 127.0.0.2 (allowed by the stack's fetch policy), serving WAV files of
    any size: /wav/<bytes>."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                size = int(self.path.rsplit("/", 1)[1])
                head = clip("wav")[:44]
                self.send_response(200)
                self.send_header("content-type", "audio/wav")
                self.send_header("content-length", str(size))
                self.end_headers()
                self.wfile.write(head + b"\0" * (size - len(head)))

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, size: int, n: int = 0) -> str:
        return f"http://127.0.0.2:{self.port}/{n}/wav/{size}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def audio_urls(urls: list[str]) -> list[dict]:
    return [{"type": "audio_url", "audio_url": {"url": u}} for u in urls]


def test_too_many_remote_urls_is_400_before_any_fetch(hstack: Stack) -> None:
    media = MediaServer()
    try:
        r = chat(hstack, "audio", messages=[{"role": "user", "content": audio_urls(
            [media.url(1000, n) for n in range(20)])}])
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_urls" and "fetch.max_urls_per_request" in err["message"]
        assert media.hits == []
    finally:
        media.close()


def test_fetched_bytes_per_request_are_budgeted(hstack: Stack) -> None:
    """Three 15 MB files: each under fetch.max_bytes, together over the request's budget."""
    media = MediaServer()
    try:
        before = peak_rss_kb(hstack)
        r = chat(hstack, "audio", timeout=60, messages=[{"role": "user", "content": audio_urls(
            [media.url(15_000_000, n) for n in range(3)])}])
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "fetch_budget_exceeded"
        assert "fetch.max_bytes_per_request" in err["message"]
        assert received(hstack, "llama") == []
        assert peak_rss_kb(hstack) - before < 250_000
        ok = chat(hstack, "audio", timeout=60, messages=[{"role": "user", "content": audio_urls(
            [media.url(100_000, n) for n in range(3)])}])
        assert ok.status_code == 200, ok.text
    finally:
        media.close()


# ---------------------------------------------------------------- 7. URLs backends fetch

@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://localhost:{admin}/config_dump",
    "http://127.0.0.1:{admin}/stats",
    "http://[::ffff:127.0.0.1]:{admin}/stats",
    "http://[64:ff9b::7f00:1]:{admin}/stats",
    "http://[2002:7f00:1::]:{admin}/stats",
    "http://10.0.0.1/x.png",
    "https://[::1]:{admin}/x.png",
])
def test_urls_for_a_self_fetching_backend_pass_the_fetch_policy(hstack: Stack, url: str) -> None:
    """vLLM fetches image URLs itself: the cloud metadata service and Envoy's own admin port
    reached it as given."""
    admin = hstack.config.envoy.admin_port
    r = chat(hstack, "see", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url.format(admin=admin)}}]}])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "url_refused"
    assert r.json()["error"]["param"] == "messages[0].content[0]"
    assert received(hstack, "seer") == []


def test_allowed_urls_and_unchecking_backends_still_get_urls(hstack: Stack) -> None:
    url = "http://127.0.0.2:9/cat.png"  # allowed by the stack's fetch.allow_hosts
    part = {"type": "image_url", "image_url": {"url": url}}
    assert chat(hstack, "see", messages=[{"role": "user", "content": [part]}]).status_code == 200
    assert received(hstack, "seer")[0]["json"]["messages"][0]["content"] == [part]
    meta = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}
    r = chat(hstack, "trust", messages=[{"role": "user", "content": [meta]}])
    assert r.status_code == 200  # parts.check_urls: false is the operator's choice
    assert received(hstack, "trusting")[0]["json"]["messages"][0]["content"] == [meta]


# ---------------------------------------------------------------- 3, 4. aux vision shared fairly

@pytest.fixture(scope="module")
def vstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(
        backends=[{"name": "txt", "preset": "llamacpp",
                   "models": [{"name": "blind-m", "capabilities": ["tools"]}]},
                  {"name": "aux", "preset": "openai",
                   "models": [{"name": "ocr", "capabilities": ["vision"]}]}],
        models=[{"name": "blind", "candidates": [{"backend": "txt", "model": "blind-m"}]}],
        vision={"backend": "aux", "model": "ocr", "timeout_s": 10, "concurrency": 2,
                "max_images_per_request": 12})
    tmp = tmp_path_factory.mktemp("hardening-vision")
    stack = Stack(write_config(tmp, cfg), workdir=str(tmp)).start()
    yield stack
    stack.stop()


@pytest.fixture
def vclean(vstack: Stack) -> None:
    for b in ("aux", "txt"):
        reset(vstack, b)


def images(widths: range) -> list[dict]:
    from ..media import data_url, png

    return [{"type": "image_url", "image_url": {"url": data_url("image/png", png(w, 3))}}
            for w in widths]


def ask(stack: Stack, parts: list[dict], timeout: float = 30) -> httpx.Response:
    return chat(stack, "blind", timeout=timeout, messages=[{"role": "user", "content": parts}])


def test_too_many_images_is_400_before_any_aux_call(vstack: Stack, vclean: None) -> None:
    r = ask(vstack, images(range(100, 113)))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_images" and "vision.max_images_per_request" in err["message"]
    assert received(vstack, "aux") == [] and received(vstack, "txt") == []


def test_one_requests_images_do_not_starve_anothers(vstack: Stack, vclean: None) -> None:
    """Two aux calls at once; one request with 12 new images, then another with one: that
    one gets the next free slot instead of waiting behind all twelve (it timed out)."""
    behave(vstack, "aux", delay_s=0.6, content="a red square")  # no OCR: the delay is the call
    out: dict[str, float | int] = {}

    def big() -> None:
        t0 = time.monotonic()
        out["big"] = ask(vstack, images(range(200, 212))).status_code
        out["big_s"] = time.monotonic() - t0

    t = threading.Thread(target=big)
    try:
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        r = ask(vstack, images(range(300, 301)))
        small_s = time.monotonic() - t0
        t.join(timeout=30)
    finally:
        reset(vstack, "aux")
    assert r.status_code == 200 and out["big"] == 200, (r.text, out)
    assert r.headers["x-extproc-vision"].startswith("substituted=1; cached=0")
    print(f"one image waited {small_s:.2f}s while twelve took {out['big_s']:.2f}s")
    assert out["big_s"] > 3.5  # six rounds of two
    assert small_s < 2.0, small_s  # one slot's wait and its own call, not the whole batch


def test_a_shared_aux_call_survives_the_first_client_leaving(vstack: Stack,
                                                            vclean: None) -> None:
    """Two clients send the same new image; the first gives up and disconnects while the
    aux call they share is in flight. The second used to get a 504 after 11 s."""
    behave(vstack, "aux", delay_s=2.0, content="a red square")
    image = images(range(400, 401))
    out: dict[str, object] = {}

    def impatient() -> None:
        try:
            ask(vstack, image, timeout=0.7)
        except httpx.TimeoutException:
            out["left"] = True

    t = threading.Thread(target=impatient)
    try:
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        r = ask(vstack, image, timeout=20)
        waited = time.monotonic() - t0
        t.join()
    finally:
        reset(vstack, "aux")
    assert out.get("left") is True
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-vision"] == "substituted=1; cached=1; failed=0; model=ocr"
    assert waited < 4
    assert len(received(vstack, "txt")) == 1  # only the client that stayed reached it


def test_an_answer_over_the_buffer_limit_is_a_502_naming_it(hstack: Stack) -> None:
    """Non-streaming answers are held whole; one over envoy.max_body_bytes was a bare 500."""
    behave(hstack, "good", pad_bytes=33 * 1024 * 1024)
    r = chat(hstack, "plain", timeout=60)
    assert r.status_code == 502, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "response_too_large" and err["model"] == "plain"
    assert "envoy.max_body_bytes" in err["message"] and err["request_id"]
