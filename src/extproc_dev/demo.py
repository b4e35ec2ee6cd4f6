"""`make demo`: start the local stack, send real requests with the openai SDK, show where each
went and what came back, then stop everything."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import anthropic
import httpx
import openai

from .stack import Stack

CASES: list[tuple[str, str | None, str]] = [
    ("exact model name", "qwen3-coder-25b", "routes to the vLLM backend serving it"),
    ("alias", "coder-big", "alias -> qwen3-coder-40b on llama.cpp (served as -q5)"),
    ("cloud alias", "cloud", "the cloud backend gets its own key, never the client's"),
    ("backend model", "llama3.2:3b", "a backend model exposed under its own name"),
    ("no model", None, "the configured default model"),
    ("failover", "coder", "vLLM answers 503 once: Envoy retries the next candidate (Ollama)"),
    ("unknown model", "gpt-9", "404 model_not_found listing the models"),
    ("audio_url", "omni", "an audio_url part: llama.cpp only takes input_audio, converted"),
    ("image, blind", "coder-big", "text-only model: the image is replaced by the OCR aux model's "
     "description"),
    ("image, vision", "gemma-4-e4b", "a vision model gets the image itself"),
    ("local default", "assistant", "local model first when no hint is given"),
    ("force-cloud", "assistant", "metadata route_intent=force-cloud: only cloud-tagged models"),
    ("auto:vision", "auto:vision", "a virtual model: every model declaring vision"),
]


# Other APIs: (label, API, model, why).
API_CASES: list[tuple[str, str, str, str]] = [
    ("messages", "messages", "coder", "Anthropic Messages: vLLM speaks it, passed through"),
    ("messages->chat", "messages", "cloud", "OpenAI has no Messages API: translated both ways"),
    ("responses", "responses", "coder-big", "Responses: llama.cpp speaks it, passed through"),
    ("responses->chat", "responses", "omni", "an older llama.cpp (chat only): translated"),
    ("responses stream", "responses-stream", "omni", "the chat stream as Responses events"),
    ("transcription", "transcription", "gemma-4-e4b", "a multipart upload: routed by its form's "
     "model, the file byte for byte"),
    ("rerank", "rerank", "coder", "rerank routed by model to a server that serves it"),
]


def _other_api(stack: Stack, api: str, model: str) -> tuple[int, httpx.Headers, str]:
    """One request on another API with the official client for it: (status, headers, answer)."""
    base = stack.envoy_url
    if api == "messages":
        raw = anthropic.Anthropic(base_url=base, api_key="client-key", max_retries=0) \
            .messages.with_raw_response.create(model=model, max_tokens=64, messages=[
                {"role": "user", "content": "hi"}])
        return raw.status_code, raw.headers, raw.parse().content[0].text  # type: ignore[union-attr]
    c = openai.OpenAI(base_url=base + "/v1", api_key="client-key", max_retries=0)
    if api == "responses":
        rr = c.responses.with_raw_response.create(model=model, input="hi")
        return rr.status_code, rr.headers, rr.parse().output_text
    if api == "responses-stream":
        with c.responses.with_streaming_response.create(model=model, input="hi",
                                                        stream=True) as sr:
            text = "".join(e.delta for e in sr.parse() if e.type == "response.output_text.delta")
            return sr.status_code, sr.headers, text
    if api == "transcription":
        tr = c.audio.transcriptions.with_raw_response.create(
            model=model, file=("tone.wav", _wav_bytes(), "audio/wav"))
        return tr.status_code, tr.headers, tr.parse().text
    r = httpx.post(base + "/v1/rerank", json={"model": model, "query": "gateway",
                                              "documents": ["envoy", "nginx"]})
    return r.status_code, r.headers, f"results: {r.json().get('results')}"


def _wav_bytes() -> bytes:
    import base64

    return base64.b64decode(_wav_data_url().split(",", 1)[1])


def _wav_data_url() -> str:
    import base64
    import io

    import numpy as np
    import soundfile

    buf = io.BytesIO()
    tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    soundfile.write(buf, tone.astype("float32"), 16000, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_data_url() -> str:
    import base64
    import io

    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (460, 120), "white")
    ImageDraw.Draw(img).text((20, 35), "INVOICE 4711", fill="black",
                             font=ImageFont.load_default(size=44))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w)[:w] for c, w in zip(cells, widths, strict=True))


def _discovery(stack: Stack) -> int:
    """A model pulled into Ollama mid-run becomes routable by name with what it reported it
    can do; dropped, it is a 404. Returns the number of steps that went wrong."""
    ollama = stack.backend_url("local-ollama") + "/_emulator/models"
    declared = ["llama3.2:3b", "qwen3-coder:25b"]

    def listed() -> set[str]:
        return {m["id"] for m in httpx.get(stack.envoy_url + "/v1/models").json()["data"]}

    def until(check: Callable[[], bool]) -> float:
        t0 = time.monotonic()
        while not check() and time.monotonic() - t0 < 60:
            time.sleep(0.25)
        return time.monotonic() - t0

    print("\ndiscovery (no config edit, no restart):")
    httpx.post(ollama, json={"models": [*declared, "llava:7b"],
                             "cards": {"llava:7b": {"capabilities": ["completion", "vision"]}}})
    took = until(lambda: "llava:7b" in listed())
    image = [{"type": "text", "text": "What is the invoice number?"},
             {"type": "image_url", "image_url": {"url": _png_data_url()}}]
    r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": "llava:7b", "messages": [{"role": "user", "content": image}]})
    print(f"  `ollama pull llava:7b` (it reports vision): listed after {took:.1f} s; an image "
          f"to it -> {r.status_code} from {r.headers.get('x-extproc-backend', '-')}, "
          f"aux vision: {r.headers.get('x-extproc-vision', 'not used (it sees images)')}")
    bad = r.status_code != 200 or "x-extproc-vision" in r.headers
    httpx.post(ollama, json={"models": declared})
    took = until(lambda: "llava:7b" not in listed())
    r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": "llava:7b", "messages": [{"role": "user", "content": "hi"}]})
    print(f"  `ollama rm llava:7b`: gone after {took:.1f} s; a request for it -> "
          f"{r.status_code} {r.json().get('error', {}).get('code')}")
    return bad + (r.status_code != 404)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="config/demo.yaml")
    args = ap.parse_args(argv)
    os.environ.setdefault("DEMO_OPENAI_KEY", "sk-demo-local-not-a-secret")
    with Stack(args.config, workdir=tempfile.mkdtemp(prefix="extproc-demo-")) as stack:
        print(f"stack up: Envoy on {stack.envoy_url}, logs in {stack.log_dir}; {stack.lane}\n")
        c = openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="client-key", max_retries=0)
        ids = [m.id for m in c.models.list()]
        print(f"GET /v1/models -> {len(ids)} models: {', '.join(ids)}\n")
        widths = [16, 16, 7, 15, 19, 44]
        print(_row(["case", "model asked", "status", "backend", "served model", "answer"], widths))
        print(_row(["-" * w for w in widths], widths))
        failures = 0
        for label, model, _why in CASES:
            if label == "failover":
                httpx.post(stack.backend_url("local-vllm") + "/_emulator/behaviour",
                           json={"fail_status": 503, "fail_times": 1})
            try:
                if model is None:
                    # The SDK requires a model; send a raw request without one.
                    r = httpx.post(stack.envoy_url + "/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "hi"}]})
                    status, hdrs = r.status_code, r.headers
                    answer = r.json()["choices"][0]["message"]["content"]
                else:
                    content: object = "hi"
                    if label == "audio_url":
                        content = [{"type": "text", "text": "What is said here?"},
                                   {"type": "audio_url", "audio_url": {"url": _wav_data_url()}}]
                    if label.startswith("image"):
                        content = [{"type": "text", "text": "What is the invoice number?"},
                                   {"type": "image_url", "image_url": {"url": _png_data_url()}}]
                    extra: dict[str, object] = {}
                    if label == "force-cloud":
                        extra = {"metadata": {"route_intent": "force-cloud",
                                              "session_id": "demo-session-1"}}
                    raw = c.chat.completions.with_raw_response.create(
                        model=model, messages=[{"role": "user", "content": content}], **extra)
                    status, hdrs = raw.status_code, raw.headers
                    answer = raw.parse().choices[0].message.content or ""
            except openai.APIStatusError as exc:
                status, hdrs = exc.status_code, exc.response.headers
                answer = f"{exc.body.get('code')}: {exc.body.get('message', '')}"
            expected_ok = model != "gpt-9"
            if (status == 200) != expected_ok:
                failures += 1
            if hdrs.get("x-extproc-converted-parts"):
                answer = f"[{hdrs['x-extproc-converted-parts']} part converted] {answer}"
            if hdrs.get("x-extproc-vision"):
                answer = f"[vision: {hdrs['x-extproc-vision'].split(';')[0]}] {answer}"
            print(_row([label, model or "(none)", str(status), hdrs.get("x-extproc-backend", "-"),
                        hdrs.get("x-extproc-model", "-"), answer], widths))
        print("\nwhy:")
        for label, model, why in CASES:
            print(f"  {label:16} {model or '(none)':16} {why}")
        print("\nother APIs (the anthropic and openai SDKs):")
        widths = [16, 12, 7, 19, 15, 44]
        print(_row(["case", "model asked", "status", "backend", "translated", "answer"],
                   widths))
        print(_row(["-" * w for w in widths], widths))
        for label, api, model, _why in API_CASES:
            try:
                status, hdrs, answer = _other_api(stack, api, model)
            except (openai.APIStatusError, anthropic.APIStatusError) as exc:
                status, hdrs, answer = exc.status_code, exc.response.headers, str(exc.body)
            failures += status != 200
            print(_row([label, model, str(status), hdrs.get("x-extproc-backend", "-"),
                        hdrs.get("x-extproc-translated", "-"), answer], widths))
        print("\nwhy:")
        for label, _api, model, why in API_CASES:
            print(f"  {label:16} {model:12} {why}")
        failures += _discovery(stack)
        blind = httpx.get(stack.backend_url("local-llamacpp") + "/_emulator/requests").json()
        last = [r for r in blind["requests"] if r["method"] == "POST"
                and r["path"].endswith("/chat/completions")][-1]["json"]["messages"][0]
        print("\nwhat the text-only llama.cpp backend received for the image:")
        for part in last["content"]:
            print(f"  {part['type']}: {part.get('text', '')[:400]}")
        print(f"\nrouting decisions (one JSON line per request): {stack.log_path('service')}")
    print("stack stopped.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
