"""The requests sent to the real vLLM and to our vLLM emulator, and how answers are compared.

An answer is reduced to what a client or the gateway relies on: the status, the content type,
for JSON the *shape* (every key, with its value's kind: string, number, bool, null, object,
list of the first element's shape) and for errors the error's ``type``; for a stream, the shape
of its first and last events (their deltas left out: what a delta holds is the model's doing)
and whether it ends with ``[DONE]``. Text the random model writes,
ids and timings are not compared. Two answers differ where their reductions do; every
difference must be fixed in the emulator or listed, with its reason, in
``vllm_differences.yaml``.
"""

from __future__ import annotations

import base64
import io
import math
import struct
import wave
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from .servers import SERVED_NAME


def _wav() -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 5)))
                               for i in range(800)))
    return base64.b64encode(buf.getvalue()).decode()


PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSu"
       "QmCC")
WAV = _wav()


def chat(content: Any = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_NAME, "max_tokens": 8,
            "messages": [{"role": "user", "content": content}], **extra}


def part(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "What is this?"}, p]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    path: str = "/v1/chat/completions"
    body: dict[str, Any] | bytes | None = None
    method: str = "POST"
    stream: bool = False
    content_type: str = "application/json"


CASES: tuple[Case, ...] = (
    Case("models", "the model list", "/v1/models", method="GET"),
    Case("version", "the server's version", "/version", method="GET"),
    Case("health", "the health endpoint", "/health", method="GET"),
    Case("unknown_path", "a path it does not serve", "/v1/nothing", method="GET"),
    Case("chat", "a plain chat", body=chat()),
    Case("chat_stream", "a streamed chat", body=chat(stream=True), stream=True),
    Case("chat_stream_usage", "a streamed chat with usage at the end",
         body=chat(stream=True, stream_options={"include_usage": True}), stream=True),
    Case("text_parts", "content as text parts", body=chat(
        [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}])),
    Case("metadata", "OpenAI's metadata field", body=chat(metadata={"session": "s1"})),
    Case("unknown_model", "a model it does not serve", body={**chat(), "model": "nope"}),
    Case("no_model", "no model named", body={k: v for k, v in chat().items() if k != "model"}),
    Case("no_messages", "no messages", body={"model": SERVED_NAME}),
    Case("bad_json", "a body that is not JSON", body=b'{"model": "tiny-qwen", "messages": ['),
    Case("messages_not_list", "messages is a string", body={**chat(), "messages": "hi"}),
    Case("unknown_role", "a role it does not know",
         body={**chat(), "messages": [{"role": "wizard", "content": "hi"}]}),
    Case("too_long", "max_tokens beyond the context", body=chat(max_tokens=5000)),
    Case("image_url", "an image to a text-only model",
         body=chat(part({"type": "image_url",
                         "image_url": {"url": f"data:image/png;base64,{PNG}"}}))),
    Case("image_url_string", "image_url as a bare string",
         body=chat(part({"type": "image_url", "image_url": f"data:image/png;base64,{PNG}"}))),
    Case("input_audio", "input_audio to a text-only model",
         body=chat(part({"type": "input_audio", "input_audio": {"data": WAV,
                                                                "format": "wav"}}))),
    Case("audio_url", "audio_url to a text-only model",
         body=chat(part({"type": "audio_url",
                         "audio_url": {"url": f"data:audio/wav;base64,{WAV}"}}))),
    Case("video_url", "video_url to a text-only model",
         body=chat(part({"type": "video_url",
                         "video_url": {"url": "data:video/mp4;base64,AAAA"}}))),
    Case("hf_image", "the Hugging Face style {type: image, url}",
         body=chat(part({"type": "image", "url": f"data:image/png;base64,{PNG}"}))),
    Case("hf_audio", "the Hugging Face style {type: audio, url}",
         body=chat(part({"type": "audio", "url": f"data:audio/wav;base64,{WAV}"}))),
    Case("input_image", "a Responses-style input_image",
         body=chat(part({"type": "input_image", "detail": "auto",
                         "image_url": f"data:image/png;base64,{PNG}"}))),
    Case("input_image_no_detail", "a Responses-style input_image without detail",
         body=chat(part({"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}))),
    Case("input_text_first", "a Responses-style input_text as the first part",
         body=chat([{"type": "input_text", "text": "Say hello."}])),
    Case("input_text_later", "input_text after a text part",
         body=chat(part({"type": "input_text", "text": "Say hello."}))),
    Case("untyped_image_url_first", "an image part without a type, first",
         body=chat([{"image_url": {"url": f"data:image/png;base64,{PNG}"}}])),
    Case("untyped_image_url_later", "an image part without a type, after a text part",
         body=chat(part({"image_url": {"url": f"data:image/png;base64,{PNG}"}}))),
    Case("unknown_part_first", "a part type nobody defines, first",
         body=chat([{"type": "hologram"}])),
    Case("unknown_part", "a part type nobody defines, later",
         body=chat(part({"type": "hologram"}))),
    Case("text_without_text", "a text part without its text", body=chat([{"type": "text"}])),
    Case("refusal_part", "a refusal part", body=chat([{"type": "refusal", "refusal": "no"}])),
    Case("file_part", "a file part", body=chat(part({"type": "file", "file": {
        "file_id": "file-1"}}))),
    Case("tools_auto", "tools offered, the model chooses", body=chat(tools=WEATHER)),
    Case("tools_required", "a tool call forced (required)",
         body=chat(tools=WEATHER, tool_choice="required", max_tokens=16)),
    Case("tools_named", "a named tool forced",
         body=chat(tools=WEATHER, max_tokens=16, tool_choice={
             "type": "function", "function": {"name": "get_weather"}})),
    # Greedy: sampled, the random model's output sometimes fails llama.cpp's JSON grammar,
    # which it answers with a 500 (seen once in CI); greedy, it passes every time.
    Case("json_object", "response_format json_object (greedy)",
         body=chat(response_format={"type": "json_object"}, temperature=0)),
    Case("get_chat", "GET on the chat endpoint", method="GET"),
    Case("wrong_content_type", "a body sent as text/plain", body=b"hi",
         content_type="text/plain"),
    Case("completions", "the legacy completions endpoint", "/v1/completions",
         body={"model": SERVED_NAME, "prompt": "Say hello.", "max_tokens": 8}),
)
BY_NAME = {c.name: c for c in CASES}


@dataclass
class Answer:
    """What a server answered one case with, reduced to what is compared."""

    status: int
    content_type: str
    shape: Any = None
    error_type: str | None = None
    message: str | None = None  # an error's message, its first line
    param: str | None = None  # the field an error names
    raw: str = ""  # the start of the answer, for the report
    events: list[Any] = field(default_factory=list)


def kind(value: Any) -> Any:
    """A JSON value's shape: keys kept, leaves replaced by their kind."""
    if isinstance(value, dict):
        return {k: kind(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [kind(value[0])] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "string"


def ask(client: httpx.Client, base: str, case: Case) -> Answer:
    """Send one case to a server (``base``: scheme, host and port)."""
    body = case.body
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    if isinstance(body, bytes):
        kwargs["headers"] = {"content-type": case.content_type}
    r = client.request(case.method, base + case.path, timeout=120,
                       **(kwargs if case.method == "POST" else {}))
    ctype = r.headers.get("content-type", "").split(";")[0].strip()
    answer = Answer(r.status_code, ctype, raw=r.text[:300])
    if ctype == "text/event-stream":
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        parsed = [orjson.loads(e) for e in events if e != "[DONE]"]
        answer.events = parsed
        def undelta(event: Any) -> Any:  # a delta is the model's: a token, a role, nothing
            event = dict(event)
            if event.get("choices"):
                event["choices"] = [{k: v for k, v in event["choices"][0].items()
                                     if k != "delta"}]
            return kind(event)

        answer.shape = {"first": undelta(parsed[0]) if parsed else None,
                        "last": undelta(parsed[-1]) if parsed else None,
                        "done": bool(events) and events[-1] == "[DONE]"}
        return answer
    try:
        data = r.json()
    except ValueError:
        return answer
    answer.shape = kind(data)
    if r.status_code >= 400 and isinstance(data, dict):
        err = data.get("error") if isinstance(data.get("error"), dict) else data
        answer.error_type = err.get("type") if isinstance(err.get("type"), str) else None
        if "message" in err:
            answer.message = str(err["message"]).split("\n")[0][:200]
        answer.param = err.get("param") if isinstance(err.get("param"), str) else None
    return answer


def differences(real: Answer, emulated: Answer) -> list[str]:
    """Where the emulator's answer differs from the real server's (empty: conforms)."""
    out = []
    if real.status != emulated.status:
        out.append(f"status: real {real.status}, emulator {emulated.status}")
    if real.content_type != emulated.content_type:
        out.append(f"content-type: real {real.content_type!r}, emulator "
                   f"{emulated.content_type!r}")
    if real.error_type != emulated.error_type:
        out.append(f"error type: real {real.error_type!r}, emulator {emulated.error_type!r}")
    if real.message != emulated.message:
        out.append(f"error message: real {real.message!r}, emulator {emulated.message!r}")
    if real.param != emulated.param:
        out.append(f"error param: real {real.param!r}, emulator {emulated.param!r}")
    out += _shape_diff(real.shape, emulated.shape, "body")
    return out


def _shape_diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only the real server has it" for k in a if k not in b]
        out += [f"{where}.{k}: only the emulator has it" for k in b if k not in a]
        for k in a:
            if k in b:
                out += _shape_diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        return _shape_diff(a[0], b[0], f"{where}[0]") if a and b else []
    if a == b or "null" in (a, b):  # null where the other has a value: a value, not a shape
        return []
    return [f"{where}: real {_short(a)}, emulator {_short(b)}"]


def _short(shape: Any) -> str:
    text = orjson.dumps(shape).decode()
    return text if len(text) < 60 else text[:57] + "..."
