"""Content parts through a real Envoy, with emulators that enforce each backend's part rules."""

from __future__ import annotations

import base64
import io
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import soundfile

from extproc_dev.stack import Stack

from ..media import b64, clip, data_url, png
from .conftest import fetch_refusal, received, reset, stack_config, start_stack, wait_line

WAV, FLAC, OGG = clip("wav"), clip("flac"), clip("ogg")
PNG = png()


class MediaServer:
    """HTTPS (or plain HTTP) server on loopback serving fixed files; records every request."""

    def __init__(self, cert: Path | None = None, key: Path | None = None):
        self.files: dict[str, tuple[str, bytes]] = {
            "/speech.wav": ("audio/wav", WAV), "/speech.flac": ("audio/flac", FLAC),
            "/cat.png": ("image/png", PNG), "/page.html": ("text/html", b"<html></html>")}
        self.hits: list[str] = []
        self.redirect_to = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("location", outer.redirect_to)
                    self.end_headers()
                    return
                mime, data = outer.files.get(self.path, ("", b""))
                self.send_response(200 if data else 404)
                self.send_header("content-type", mime or "text/plain")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if cert and key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    server = MediaServer(cert, key)
    server.cert = cert  # type: ignore[attr-defined]
    yield server
    server.close()


@pytest.fixture(scope="module")
def parts_stack(tmp_path_factory: pytest.TempPathFactory, media: MediaServer) -> Iterator[Stack]:
    presets = ["vllm", "sglang", "llamacpp", "ollama", "openai"]
    cfg = stack_config(
        # vLLM reports no capabilities (declared here); llama.cpp reports audio itself.
        backends=[{"name": p, "preset": p, "models": [
            {"name": f"{p}-model", "capabilities": ["audio", "vision"]} if p == "vllm"
            else f"{p}-model"]} for p in presets],
        models=[*({"name": f"m-{p}", "candidates": [{"backend": p, "model": f"{p}-model"}]}
                  for p in presets),
                # candidates that take different parts: adapted per attempt
                {"name": "m-mixed", "candidates": [{"backend": "vllm", "model": "vllm-model"},
                                                   {"backend": "llamacpp",
                                                    "model": "llamacpp-model"}]}],
        fetch={"allow_hosts": ["localhost"], "ca_bundle": str(media.cert)},  # type: ignore[attr-defined]
    )
    stack = start_stack(tmp_path_factory.mktemp("parts"), cfg)
    yield stack
    stack.stop()


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="k", max_retries=0,
                         timeout=30)


def send(stack: Stack, preset: str, *parts: dict) -> list[dict]:
    """Send one user message; return the parts the backend received."""
    reset(stack, preset)
    client(stack).chat.completions.create(
        model=f"m-{preset}", messages=[{"role": "user", "content": list(parts)}])
    (got,) = received(stack, preset)
    return got["json"]["messages"][0]["content"]


def post(stack: Stack, model: str, *parts: object) -> httpx.Response:
    return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": list(parts)}]})


SEED_TEXT = {"type": "text", "text": "What is said in this clip?"}


def test_seed_audio_url_data_reaches_vllm_intact_and_llamacpp_as_input_audio(parts_stack) -> None:
    part = {"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}}
    assert send(parts_stack, "vllm", SEED_TEXT, part) == [SEED_TEXT, part]
    got = send(parts_stack, "llamacpp", SEED_TEXT, part)
    assert got == [SEED_TEXT, {"type": "input_audio",
                               "input_audio": {"data": b64(WAV), "format": "wav"}}]


def test_conversion_once_per_request_or_per_attempt(parts_stack) -> None:
    """One candidate (or all alike): the route stage converts the body once and the request
    goes straight to the backend (plan "direct"). Candidates that take different parts: each
    attempt gets its own shape (vLLM keeps audio_url; after its 503, llama.cpp input_audio)."""
    part = {"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}}
    as_input_audio = {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}
    once = post(parts_stack, "m-llamacpp", part)
    assert once.status_code == 200 and once.headers["x-extproc-converted-parts"] == "1"
    rec = wait_line(parts_stack, "service", once.headers["x-request-id"], '"routing.decision"')
    assert (rec["plan"], rec["converted_parts"], rec["outcome"]) == ("direct", 1, "ok")
    for b in ("vllm", "llamacpp"):
        reset(parts_stack, b)
    httpx.post(parts_stack.backend_url("vllm") + "/_emulator/behaviour",
               json={"fail_status": 503, "fail_times": 1})
    mixed = post(parts_stack, "m-mixed", part)
    assert mixed.status_code == 200 and mixed.headers["x-extproc-attempts"] == "2"
    assert mixed.headers["x-extproc-converted-parts"] == "1"
    (first,) = received(parts_stack, "vllm")
    (second,) = received(parts_stack, "llamacpp")
    assert first["json"]["messages"][0]["content"] == [part]
    assert second["json"]["messages"][0]["content"] == [as_input_audio]
    rec = wait_line(parts_stack, "service", mixed.headers["x-request-id"], '"routing.decision"')
    assert (rec["plan"], rec["converted_parts"]) == ("per_attempt", 1)


def test_seed_audio_url_https(parts_stack, media: MediaServer) -> None:
    url = f"https://localhost:{media.port}/speech.wav"
    part = {"type": "audio_url", "audio_url": {"url": url}}
    media.hits.clear()
    assert send(parts_stack, "vllm", part) == [part]  # vLLM fetches URLs itself
    assert media.hits == []
    got = send(parts_stack, "llamacpp", part)
    assert got == [{"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}]
    assert media.hits == ["/speech.wav"]


def test_input_audio_reaches_vllm_intact(parts_stack) -> None:
    part = {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}
    assert send(parts_stack, "vllm", part) == [part]


def test_string_image_url_reaches_openai_as_object(parts_stack) -> None:
    url = data_url("image/png", PNG)
    got = send(parts_stack, "openai", {"type": "image_url", "image_url": url})
    assert got == [{"type": "image_url", "image_url": {"url": url}}]


def test_https_image_inlined_for_ollama(parts_stack, media: MediaServer) -> None:
    url = f"https://localhost:{media.port}/cat.png"
    got = send(parts_stack, "ollama", {"type": "text", "text": "what is it?"},
               {"type": "image_url", "image_url": {"url": url, "detail": "high"}})
    assert got[1] == {"type": "image_url", "image_url": {"url": data_url("image/png", PNG)}}


HF_AND_RESPONSES = [
    {"type": "input_text", "text": "describe"},
    {"type": "input_image", "image_url": data_url("image/png", PNG), "detail": "low"},
    {"type": "image", "url": data_url("image/png", PNG)},
]
HF_AUDIO = {"type": "audio", "url": data_url("audio/wav", WAV)}


@pytest.mark.parametrize("preset", ["vllm", "sglang", "llamacpp", "openai", "ollama"])
def test_hf_and_responses_parts_reach_each_preset_in_an_accepted_shape(parts_stack,
                                                                       preset: str) -> None:
    parts = HF_AND_RESPONSES + ([] if preset == "ollama" else [HF_AUDIO])
    got = send(parts_stack, preset, *parts)  # the emulator refuses anything its server would
    # (vLLM too: it refuses input_text as a message's first part, see make conformance)
    assert got[0] == {"type": "text", "text": "describe"}
    assert len(got) == len(parts)


def test_flac_reaches_wav_only_backend_as_valid_wav(parts_stack) -> None:
    got = send(parts_stack, "llamacpp",
               {"type": "input_audio", "input_audio": {"data": b64(FLAC), "format": "flac"}})
    audio = got[0]["input_audio"]
    assert audio["format"] == "wav"
    raw = base64.b64decode(audio["data"])
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    samples, rate = soundfile.read(io.BytesIO(raw))
    assert rate == 16000 and len(samples) == 4000
    assert abs(float(abs(samples).max()) - 0.3) < 0.01  # the same tone, decoded


def test_format_mismatch_fixed_and_reported(parts_stack) -> None:
    reset(parts_stack, "llamacpp")
    r = post(parts_stack, "m-llamacpp",
             {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "mp3"}})
    assert r.status_code == 200
    assert "declared mp3, the bytes are wav" in r.headers["x-extproc-warnings"]
    (got,) = received(parts_stack, "llamacpp")
    assert got["json"]["messages"][0]["content"][0]["input_audio"]["format"] == "wav"


def test_unchanged_parts_body_is_not_reserialised(parts_stack) -> None:
    """vLLM takes everything as sent; its exact bytes (spacing and all) reach it."""
    reset(parts_stack, "vllm")
    raw = ('{"model":  "m-vllm", "messages": [{"role": "user", "content": [\n'
           f'  {{"type": "audio_url", "audio_url": {{"url": "{data_url("audio/wav", WAV)}"}}}}'
           ']}]}')
    r = httpx.post(parts_stack.envoy_url + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    (got,) = received(parts_stack, "vllm")
    assert got["body_bytes"] == len(raw) - len("m-vllm") + len("vllm-model")
    assert "x-extproc-converted-parts" not in r.headers


# ---------------------------------------------------------------- errors


def err(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def test_not_json_is_invalid_json_with_position(parts_stack) -> None:
    r = httpx.post(parts_stack.envoy_url + "/v1/chat/completions",
                   content=b'{"model": "m-vllm", "messages": [}')
    e = err(r)
    assert r.status_code == 400 and e["code"] == "invalid_json"
    assert "line 1 column" in e["message"]


def test_schema_error_is_not_a_parse_error(parts_stack) -> None:
    r = post(parts_stack, "m-vllm", {"type": "image_url", "image_url": {"url": 42}})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "invalid_type"
    assert e["param"] == "messages[0].content[0].image_url.url"
    assert "expected a string" in e["message"]


def test_invalid_base64_names_the_part(parts_stack) -> None:
    r = post(parts_stack, "m-vllm", SEED_TEXT,
             {"type": "input_audio", "input_audio": {"data": "not*base64", "format": "wav"}})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "invalid_base64"
    assert e["param"] == "messages[0].content[1].input_audio.data"
    assert "not valid base64" in e["message"]


def test_unreadable_data_url_names_the_part(parts_stack) -> None:
    r = post(parts_stack, "m-llamacpp", {"type": "audio_url", "audio_url": {"url": "data:xyz"}})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "invalid_data_url"
    assert e["param"] == "messages[0].content[0].audio_url.url"
    assert "not a readable data URL" in e["message"]


def test_part_no_candidate_takes_names_type_and_models(parts_stack) -> None:
    r = post(parts_stack, "m-ollama", SEED_TEXT,
             {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "unsupported_content"
    assert e["param"] == "messages[0].content[1]"
    assert "input_audio audio part" in e["message"] and "ollama" in e["message"]
    assert set(e["models_accepting"]) == {"m-vllm", "m-sglang", "m-llamacpp", "m-openai", "m-mixed",
                                          "vllm-model", "sglang-model", "llamacpp-model",
                                          "openai-model"}


def test_unconvertible_audio_format_names_accepted_formats(parts_stack) -> None:
    m4a = b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + b"\x00" * 64
    r = post(parts_stack, "m-llamacpp",
             {"type": "input_audio", "input_audio": {"data": b64(m4a), "format": "m4a"}})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "unsupported_content"
    assert "accept audio formats: mp3, wav" in e["message"]


@pytest.mark.parametrize("url", ["https://127.0.0.1:{port}/speech.wav",
                                 "https://169.254.169.254/latest/meta-data/",
                                 "https://[::1]:{port}/speech.wav"])
def test_private_and_metadata_urls_refused(url: str) -> None:
    """Default policy (no allow list): the local server must receive nothing."""
    server = MediaServer()
    try:
        exc = fetch_refusal(url.format(port=server.port), allow_http=True)
        assert exc.reply.status == 400 and exc.reply.code == "url_refused"
        assert server.hits == []
    finally:
        server.close()


def test_private_url_refused_through_envoy(parts_stack, media: MediaServer) -> None:
    media.hits.clear()
    reset(parts_stack, "ollama")
    r = post(parts_stack, "m-ollama", {"type": "image_url",
                                      "image_url": f"https://127.0.0.1:{media.port}/cat.png"})
    e = err(r)
    assert r.status_code == 400 and e["code"] == "url_refused"
    assert e["param"] == "messages[0].content[0]" and "non-public address" in e["message"]
    assert media.hits == []
    assert received(parts_stack, "ollama") == []  # refused before reaching the backend


def test_redirect_to_private_address_refused(parts_stack, media: MediaServer) -> None:
    media.hits.clear()
    media.redirect_to = f"https://127.0.0.1:{media.port}/cat.png"
    r = post(parts_stack, "m-ollama",
             {"type": "image_url", "image_url": f"https://localhost:{media.port}/redirect"})
    assert r.status_code == 400 and err(r)["code"] == "url_refused"
    assert media.hits == ["/redirect"]  # the redirect target was never contacted


def test_fetched_non_image_refused(parts_stack, media: MediaServer) -> None:
    r = post(parts_stack, "m-ollama",
             {"type": "image_url", "image_url": f"https://localhost:{media.port}/page.html"})
    assert r.status_code == 400 and err(r)["code"] == "invalid_content_type"
