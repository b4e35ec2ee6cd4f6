"""TEST TOOL: OpenAI-compatible backend emulators (vLLM, llama.cpp, Ollama, OpenAI flavours).

Not part of the service. Used by the tests, the demo and the benchmark, because real LLM servers
cannot run here. Each flavour accepts and refuses content parts the way the real server does
(docs/content-parts.md), with the same statuses and error bodies, records exactly
what it received, and answers deterministically.

Control endpoints (emulator only): GET /_emulator/requests, POST /_emulator/reset,
POST /_emulator/behaviour {"fail_status": 503, "fail_times": 1, "delay_s": 0.5},
GET /_emulator/stream_sent (when each event of the latest stream was written, in seconds of
``time.monotonic()``: the same clock in every process on the machine, so a client can tell how
long after an event left the backend its first byte arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import gzip
import hashlib
import os
import re
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import emulated_llamacpp as llamacpp
from . import emulated_vllm as vllm
from .emulated_apis import (
    CAPABLE,
    CATALOG_PATHS,
    FLAVOUR_APIS,
    api_of,
    catalog_answer,
    message_object,
    messages_answer,
    messages_events,
    other_answer,
    read_form,
    response_object,
    responses_events,
    responses_output,
)

FLAVOURS = ("vllm", "llamacpp", "ollama", "openai", "azure", "sglang", "ocr")

# Which part types each flavour accepts (docs/content-parts.md). "image_url_string" is the
# {"type":"image_url","image_url":"<str>"} form; "untyped_image_url" is {"image_url":...} alone.
ACCEPTED_PARTS: dict[str, frozenset[str]] = {
    "openai": frozenset({"text", "image_url", "input_audio", "file"}),
    # vLLM: the types it takes in any position of a message (more in some positions:
    # emulated_vllm.check_part; all checked against a real vLLM by make conformance).
    "vllm": frozenset({"text", "image_url", "input_audio", "audio_url", "video_url"}),
    "sglang": frozenset({"text", "image_url", "input_audio", "audio_url", "video_url"}),
    "llamacpp": frozenset({"text", "image_url", "input_audio"}),
    "ollama": frozenset({"text", "image_url", "image_url_string"}),
    "ocr": frozenset({"text", "image_url"}),
}
ACCEPTED_PARTS["azure"] = ACCEPTED_PARTS["openai"]


# Where each server answers a health probe (vLLM, SGLang, llama.cpp: /health; Ollama: /api/version
# and / ("Ollama is running"); the OpenAI API has none).
HEALTH_PATHS = {"vllm": ("/health",), "sglang": ("/health",), "llamacpp": ("/health",),
                "ollama": ("/api/version", "/"), "ocr": ("/health",)}


class EmulatorError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        self.status, self.body = status, body


def _error(flavour: str, status: int, message: str, param: str | None = None,
           code: str | None = None) -> EmulatorError:
    if flavour == "vllm":
        return EmulatorError(status, vllm.error(status, message, param))
    if flavour == "llamacpp":
        return EmulatorError(status, llamacpp.error(status, message))
    if flavour == "ollama":
        return EmulatorError(status, {"error": {"message": message, "type": "api_error"
                                                if status >= 500 else "invalid_request_error",
                                                "param": None, "code": None}})
    return EmulatorError(status, {"error": {"message": message, "type": "invalid_request_error",
                                            "param": param, "code": code}})


@dataclass
class Behaviour:
    fail_status: int | None = None
    fail_times: int = 0
    delay_s: float = 0.0
    garbage: bool = False     # answer 200 with something that is not a chat completion
    ignore_tools: bool = False    # answer text even when a tool call is forced
    prose_json: bool = False      # answer prose when JSON is asked for
    bad_schema: bool = False      # answer JSON that does not match the requested schema
    reject_images: bool = False   # refuse images the way this server does without vision
    stream_delay_s: float = 0.0   # pause between SSE events
    reset: bool = False           # send half a response, then drop the connection
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    content: str | None = None    # answer exactly this text (JSON mode included)
    pad_bytes: int = 0            # make the answer's text this many bytes longer
    gzip: bool = False            # gzip answers when the request accepts it (cloud APIs do)
    unhealthy: bool = False       # the health endpoint answers 503 (llama.cpp loading a model)
    stall: bool = False           # take the request, never answer (a hung engine)
    stall_after_headers: bool = False  # a stream's headers, then silence (a stuck slot)
    stream_cut: bool = False      # a stream ends after its role delta, before any content
    stall_after_events: int = 0   # a stream stops after this many events, connection open
    finish_reason: str | None = None   # e.g. content_filter
    no_choices: bool = False      # "choices": []
    tool_arguments: str | None = None  # tool-call arguments as given (e.g. not JSON)
    catalog: str | None = None    # the model list: "garbage" (not JSON), "stall" (no answer)
    first_token_delay_s: float = 0.0  # a stream's first token comes this long after its role
    split_events: bool = False    # each SSE event written in two pieces, 50 ms apart (a
    # usage event cut inside its "completion_tokens" key)
    crlf: bool = False            # SSE lines end in CRLF (allowed by the spec; some servers)


@dataclass
class Emulator:
    """One emulated backend; the request handling is pure and testable without sockets."""

    name: str
    flavour: str
    models: list[str]
    api_key: str | None = None
    api_key_header: str = "authorization"
    api_key_scheme: str = "Bearer"
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    behaviour: Behaviour = field(default_factory=Behaviour)
    lock: threading.Lock = field(default_factory=threading.Lock)
    record_bodies: bool = True
    stream_sent: list[float] = field(default_factory=list)
    apis: frozenset[str] | None = None  # the APIs served (default: the flavour's)
    # Per model: what it reports it can do (Ollama's words) and its context.
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.apis is None:
            self.apis = FLAVOUR_APIS[self.flavour]

    # ------------------------------------------------------------ request handling
    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, Any] | bytes, str]:
        path, _, query = path.partition("?")
        if path.startswith("/_emulator/"):
            return self._control(method, path, body)
        if method == "GET" and path in HEALTH_PATHS.get(self.flavour, ()):  # no key needed
            if self.behaviour.unhealthy:
                return 503, {"error": {"code": 503, "message": "Loading model"}}, ""
            if self.flavour == "vllm":
                return 200, b"", ""  # an empty body, no content type
            if self.flavour == "llamacpp":
                return 200, {"status": "ok"}, ""
            return 200, {"version": "0.12.0"} if self.flavour == "ollama" else {}, ""
        rec: dict[str, Any] = {"method": method, "path": path, "headers": headers,
                               "ts": time.time()}
        try:
            expected = f"{self.api_key_scheme} {self.api_key}".strip()
            if self.api_key is not None and headers.get(self.api_key_header) != expected:
                raise _error(self.flavour, 401, "Incorrect API key provided",
                             code="invalid_api_key")
            if path in CATALOG_PATHS:
                with self.lock:
                    models, cards, mode = list(self.models), dict(self.cards), \
                        self.behaviour.catalog
                if mode == "garbage":
                    return 200, b"<html>not a model list</html>", "text/html"
                answer = catalog_answer(self.flavour, self.name, method, path, body, models,
                                        cards)
                if answer is not None:
                    return answer[0], answer[1], ""
            deployment = None
            if self.flavour == "azure":  # /openai/deployments/{model}/...?api-version=
                m = re.match(r"^/openai/deployments/([^/]+)(/.+)$", path)
                responses = path == "/openai/responses"
                if "api-version=" not in query or (m is None and not responses):
                    raise _error(self.flavour, 404, "Resource not found")
                deployment = m.group(1) if m else None
            api = api_of(path)
            if self.flavour == "vllm" and (api is None or api not in (self.apis or ())):
                return 404, {"detail": "Not Found"}, ""  # FastAPI's own
            if self.flavour == "vllm" and method != "POST":
                return 405, {"detail": "Method Not Allowed"}, ""
            if self.flavour == "llamacpp" and (method != "POST" or api not in (self.apis or ())):
                return 404, llamacpp.NOT_FOUND, ""
            if method != "POST" or api is None or api not in (self.apis or ()):
                raise _error(self.flavour, 404, f"no route {method} {path}")
            rec["api"] = api
            if api in ("transcriptions", "translations"):
                try:
                    data = read_form(headers.get("content-type", ""), body)
                except ValueError as exc:
                    raise _error(self.flavour, 400, f"bad multipart body: {exc}") from None
                upload = data.get("file")
                if not isinstance(upload, dict):
                    raise _error(self.flavour, 400, "the 'file' field is required",
                                 param="file")
                rec["file"] = {"filename": upload["filename"], "size": len(upload["bytes"]),
                               "sha256": hashlib.sha256(upload["bytes"]).hexdigest()}
                rec["body_sha256"] = hashlib.sha256(body).hexdigest()
            elif self.flavour in ("vllm", "llamacpp"):
                try:
                    data = vllm.parse_body(body, headers.get("content-type", "")) \
                        if self.flavour == "vllm" else llamacpp.parse_body(body)
                except ValueError as exc:
                    raise EmulatorError(exc.args[0]["error"]["code"], exc.args[0]) from None
            else:
                try:
                    data = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise _error(self.flavour, 400, f"JSON decode error: {exc}") from None
            if deployment is not None:
                data["model"] = deployment  # Azure serves the deployment the path names
            shown = {k: v for k, v in data.items() if k != "file"} \
                if isinstance(data, dict) else {"body": data}
            rec["json"] = shown if self.record_bodies else {"model": data.get("model")}
            rec["body_bytes"] = len(body)
            if self.record_bodies and len(body) <= 65536 and api not in (
                    "transcriptions", "translations"):  # as sent: duplicate keys and all
                rec["raw"] = body.decode("utf-8", "replace")
            with self.lock:
                b = self.behaviour
                if b.fail_status and b.fail_times != 0:
                    b.fail_times -= 1
                    raise _error(self.flavour, b.fail_status, f"emulated failure of {self.name}")
                garbage, quirks = b.garbage, Behaviour(**vars(b))
            if garbage:
                return 200, b"<html>upstream says hello</html>", "text/html"
            return self._complete(path, data, quirks)
        except EmulatorError as exc:
            rec["status"] = exc.status
            return exc.status, exc.body, ""
        finally:
            with self.lock:
                self.requests.append(rec)

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, Any, str]:
        if path == "/_emulator/requests":
            with self.lock:
                return 200, {"name": self.name, "requests": list(self.requests)}, ""
        if path == "/_emulator/stream_sent":
            with self.lock:
                return 200, {"sent": list(self.stream_sent)}, ""
        if path == "/_emulator/reset" and method == "POST":
            with self.lock:
                self.requests.clear()
                self.behaviour = Behaviour()
            return 200, {"ok": True}, ""
        if path == "/_emulator/models" and method == "POST":  # models loaded or removed
            change = orjson.loads(body or b"{}")
            with self.lock:
                self.models = list(change.get("models", self.models))
                self.cards = dict(change.get("cards", self.cards))
            return 200, {"ok": True}, ""
        if path == "/_emulator/behaviour" and method == "POST":
            with self.lock:
                self.behaviour = Behaviour(**orjson.loads(body or b"{}"))
            return 200, {"ok": True}, ""
        return 404, {"error": "unknown control path"}, ""

    def _check_model(self, data: dict[str, Any]) -> str:
        model = data.get("model")
        if self.flavour in ("llamacpp", "vllm") and model is None and self.models:
            return self.models[0]  # they serve what they loaded when no model is named
        if self.flavour == "llamacpp":
            return str(model)  # llama.cpp serves what it loaded, whatever the name
        if model not in self.models:
            if self.flavour == "vllm":
                raise _error("vllm", 404, f"The model `{model}` does not exist. Valid aliases: "
                             f"{', '.join(self.models)}.", param="model")
            if self.flavour == "ollama":
                raise _error("ollama", 404, f'model "{model}" not found, try pulling it first')
            raise _error(self.flavour, 404, f"The model `{model}` does not exist or you do not "
                         "have access to it.", code="model_not_found")
        return str(model)

    def _card(self, model: str) -> tuple[frozenset[str], int]:
        """What a model reports it can do (Ollama's words), and its context."""
        card = self.cards.get(model, {})
        return frozenset(card.get("capabilities", CAPABLE)), int(card.get("context", 32768))

    def _check_parts(self, messages: Any, model: str) -> None:
        """Refuse parts the way the real server does (docs/content-parts.md)."""
        if not isinstance(messages, list):
            raise _error(self.flavour, 400, "'messages' must be a list", param="messages")
        accepted = ACCEPTED_PARTS[self.flavour]
        caps = self._card(model)[0]
        text_only = not caps & {"vision", "audio"}
        for i, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                self._check_part(part, f"messages[{i}].content[{j}]", accepted, model,
                                 text_only)

    def _check_part(self, part: Any, where: str, accepted: frozenset[str], model: str,
                    text_only: bool) -> None:
        f = self.flavour
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None and isinstance(part, dict) and "image_url" in part:
            kind = "untyped_image_url"
        elif kind == "image_url" and isinstance(part.get("image_url"), str):
            kind = "image_url_string"
        if f in ("vllm", "llamacpp"):
            try:
                if f == "vllm":
                    vllm.check_part(kind, part if isinstance(part, dict) else {}, model,
                                    text_only, where.endswith("content[0]"), accepted)
                else:
                    llamacpp.check_part(kind, part if isinstance(part, dict) else {},
                                        self._card(model)[0], accepted)
            except ValueError as exc:
                raise EmulatorError(exc.args[0]["error"]["code"], exc.args[0]) from None
        elif kind not in accepted:
            if f == "openai":
                if kind == "image_url_string":
                    raise _error("openai", 400, f"Invalid type for '{where}.image_url': expected "
                                 "an object, but got a string instead.",
                                 param=f"{where}.image_url", code="invalid_type")
                raise _error("openai", 400, f"Invalid value: '{kind}'. Supported values are: "
                             "'text', 'image_url', 'input_audio', 'refusal', 'audio', and 'file'.",
                             param=f"{where}.type", code="invalid_value")
            if f == "llamacpp":
                raise _error(f, 400, f"unsupported content[].type: {kind}")
            raise _error(f, 400, f"invalid content part type: {kind}")
        if kind == "input_audio":
            audio = part.get("input_audio") or {}
            fmt, data = audio.get("format"), audio.get("data")
            if f in ("llamacpp", "openai", "sglang") and fmt not in ("wav", "mp3"):
                raise _error(f, 400, "input_audio.format must be either 'wav' or 'mp3'",
                             param=f"{where}.input_audio.format", code="invalid_value")
            try:
                base64.b64decode(data or "", validate=True)
            except (ValueError, binascii.Error):
                raise _error(f, 400, "input_audio.data contains invalid base64 data") from None
        if kind in ("image_url", "image_url_string") and f == "ollama":
            value = part["image_url"]
            url = value if isinstance(value, str) else value.get("url", "")
            if not url.startswith("data:"):
                raise _error(f, 400, "image URLs are not currently supported, please use "
                             "base64 encoded data instead")
            if not re.match(r"data:image/(jpeg|png|webp);base64,", url):
                raise _error(f, 400, "invalid image input")

    def _complete(self, path: str, data: dict[str, Any], quirks: Behaviour
                  ) -> tuple[int, Any, str]:
        created = 1_700_000_000
        api = api_of(path)
        try:
            if self.flavour == "vllm" and api == "chat":
                model = vllm.check_request(data, self.models, lambda m: self._card(m)[1])
            else:
                if self.flavour == "llamacpp" and api == "chat":
                    llamacpp.check_request(data)
                model = self._check_model(data)
        except ValueError as exc:
            raise EmulatorError(exc.args[0]["error"]["code"], exc.args[0]) from None
        if api == "messages":
            return self._messages(model, data, quirks)
        if api == "count_tokens":
            return 200, {"input_tokens": 12}, ""
        if api == "responses":
            return self._responses(model, data, quirks)
        if api not in ("chat", "completions", "embeddings"):
            payload, ctype = other_answer(str(api), self.name, model, data)
            return 200, payload, ctype
        if path.endswith("/embeddings"):
            return 200, {"object": "list", "model": model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}}, ""
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            legacy = {"id": "cmpl-emu", "object": "text_completion", "created": created,
                      "model": model, "choices": [{"index": 0, "text": f"[{self.name}]",
                                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
            return 200, vllm.completion_body(legacy) if self.flavour == "vllm" else \
                llamacpp.answer_body(legacy) if self.flavour == "llamacpp" else legacy, ""
        self._check_parts(data.get("messages"), model)
        if quirks.reject_images and _has_image(data.get("messages")):
            raise {"vllm": _error("vllm", 400, f"{model} is not a multimodal model"),
                   "llamacpp": _error("llamacpp", 500, "image input is not supported - hint: if "
                                      "this is unexpected, you may need to provide the mmproj"),
                   "ollama": _error("ollama", 500, "missing data required for image input"),
                   }.get(self.flavour, _error(self.flavour, 400, "image input is not supported"))
        message, finish = self._answer(model, data, quirks)
        if data.get("stream"):
            options = data.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            events = self._sse(model, message, finish, usage)
            if quirks.stream_cut:  # the role delta, then the end: no content ever came
                events = [events[0], events[-1]]
            return 200, events, "text/event-stream"
        body = {
            "id": "chatcmpl-emu", "object": "chat.completion", "created": created,
            "model": model,
            "choices": [] if quirks.no_choices else
            [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
        }
        return 200, vllm.chat_body(body) if self.flavour == "vllm" else \
            llamacpp.answer_body(body) if self.flavour == "llamacpp" else body, ""

    def _text(self, model: str, json_schema: Any, q: Behaviour) -> str:
        """The text a capable model answers (JSON when structured output is asked for)."""
        text = f"Hello from {self.name} serving {model}."
        if json_schema is not None and not q.prose_json:
            schema = json_schema if isinstance(json_schema, dict) else None
            value = {} if q.bad_schema else (_fake_json(schema) if schema else {"answer": text})
            text = orjson.dumps(value).decode()
        return q.content if q.content is not None else text

    def _messages(self, model: str, data: dict[str, Any], q: Behaviour
                  ) -> tuple[int, Any, str]:
        """Anthropic Messages, as vLLM, llama.cpp and Ollama serve it."""
        f = self.flavour
        if not isinstance(data.get("max_tokens"), int):
            raise _error(f, 400, "max_tokens: Field required", param="max_tokens")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _error(f, 400, "messages: Field required", param="messages")
        images = 0
        for msg in messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            for block in content if isinstance(content, list) else ():
                if not isinstance(block, dict) or block.get("type") != "image":
                    continue
                images += 1
                src = block.get("source") or {}
                if f == "ollama" and src.get("type") != "base64":
                    raise _error(f, 400, f"invalid image source type: {src.get('type')}. "
                                 "Only base64 images are supported.")
        if images and q.reject_images:
            raise _error(f, 400, f"{model} is not a multimodal model")
        fmt = data.get("output_format") if isinstance(data.get("output_format"), dict) else {}
        text = self._text(model, fmt.get("schema") if fmt.get("type") == "json_schema"
                          else None, q)
        content, stop = messages_answer(self.name, model, data, q.ignore_tools, text)
        if data.get("stream"):
            return 200, messages_events(model, content, stop), "text/event-stream"
        return 200, message_object(model, content, stop), ""

    def _responses(self, model: str, data: dict[str, Any], q: Behaviour
                   ) -> tuple[int, Any, str]:
        """OpenAI Responses (vLLM, llama.cpp, Ollama serve it over their chat engine)."""
        f = self.flavour
        items = data.get("input")
        images = 0
        for item in items if isinstance(items, list) else ():
            content = item.get("content") if isinstance(item, dict) else None
            for part in content if isinstance(content, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "input_image":
                    images += 1
                    if f == "ollama" and not str(part.get("image_url", "")).startswith("data:"):
                        raise _error(f, 400, "image URLs are not currently supported, please "
                                     "use base64 encoded data instead")
                elif kind == "input_file" and f == "ollama":
                    raise _error(f, 400, "file inputs are not currently supported")
        if images and q.reject_images:
            raise _error(f, 400, f"{model} is not a multimodal model")
        text_cfg = data.get("text") if isinstance(data.get("text"), dict) else {}
        fmt = text_cfg.get("format") if isinstance(text_cfg.get("format"), dict) else {}
        text = self._text(model, fmt.get("schema") if fmt.get("type") in (
            "json_schema", "json_object") else None, q)
        output = responses_output(model, data, q.ignore_tools, text)
        if data.get("stream"):
            return 200, responses_events(model, output), "text/event-stream"
        return 200, response_object(model, output), ""

    def _answer(self, model: str, data: dict[str, Any], q: Behaviour
                ) -> tuple[dict[str, Any], str]:
        """A capable model's answer, unless a quirk says otherwise."""
        if self.flavour == "ocr":
            text = q.content if q.content is not None else self._describe(data["messages"])
            return {"role": "assistant", "content": text}, "stop"
        tools = data.get("tools") or []
        choice = data.get("tool_choice")
        forced = choice == "required" or isinstance(choice, dict)
        if tools and forced and not q.ignore_tools:
            name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) \
                else None
            tool = next((t for t in tools if t.get("function", {}).get("name") == name), tools[0])
            fn = tool.get("function", {})
            args = q.tool_arguments if q.tool_arguments is not None else \
                orjson.dumps(_fake_json(fn.get("parameters") or {})).decode()
            return {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_emu", "type": "function",
                "function": {"name": fn.get("name"), "arguments": args}}]}, \
                q.finish_reason or "tool_calls"
        rf = data.get("response_format") or {}
        text = f"Hello from {self.name} serving {model}."
        if rf.get("type") in ("json_object", "json_schema") and not q.prose_json:
            schema = (rf.get("json_schema") or {}).get("schema")
            value = {} if q.bad_schema else (_fake_json(schema) if schema else {"answer": text})
            text = orjson.dumps(value).decode()
        if q.content is not None:
            text = q.content
        return {"role": "assistant", "content": text + " " * q.pad_bytes}, \
            q.finish_reason or "stop"

    def _describe(self, messages: list[Any]) -> str:
        from .aux_vision import describe_image

        out = []
        for msg in messages:
            for part in msg.get("content") if isinstance(msg.get("content"), list) else ():
                url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) \
                    else ""
                if url.startswith("data:"):
                    out.append(describe_image(base64.b64decode(url.split(",", 1)[1])))
        if not out:
            raise _error("openai", 400, "no image to describe", param="messages")
        return "\n".join(out)

    def _sse(self, model: str, message: dict[str, Any], finish: str, usage: bool = False
             ) -> list[bytes]:
        base = {"id": "chatcmpl-emu", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            deltas.append({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"],
                                                        "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": 0, "function": {
                "arguments": call["function"]["arguments"]}}]})
        elif message["content"]:
            words = message["content"].split(" ")
            deltas += [{"content": w + (" " if i < len(words) - 1 else "")}
                       for i, w in enumerate(words)]
        chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                  for d in deltas]
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if usage:  # stream_options.include_usage: a last chunk without choices
            chunks.append({**base, "choices": [], "usage": {
                "prompt_tokens": 10, "total_tokens": 10 + len(deltas),
                "completion_tokens": len(deltas)}})
        if self.flavour == "vllm":
            chunks = vllm.chunks(chunks)
        elif self.flavour == "llamacpp":
            chunks = llamacpp.chunks(chunks)
        end = b"\r\n\r\n" if self.behaviour.crlf else b"\n\n"
        return [b"data: " + orjson.dumps(c) + end for c in chunks] + [b"data: [DONE]" + end]


def _has_image(messages: Any) -> bool:
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for p in content if isinstance(content, list) else ():
            if isinstance(p, dict) and ("image" in str(p.get("type", "")) or "image_url" in p):
                return True
    return False


def _fake_json(schema: Any) -> Any:
    """A value that satisfies a simple JSON schema (what a capable model would produce)."""
    if not isinstance(schema, dict):
        return None
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {k: _fake_json(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_fake_json(schema.get("items") or {})]
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True}.get(str(kind))


# ---------------------------------------------------------------- minimal HTTP/1.1 server

async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    n = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(n) if n else b""


async def _serve_conn(emu: Emulator, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            body = await _read_body(reader, headers)
            delay = emu.behaviour.delay_s
            if delay and not target.startswith("/_emulator/"):
                await asyncio.sleep(delay)
            status, payload, ctype = await asyncio.get_running_loop().run_in_executor(
                None, emu.handle, method, target, headers, body)
            inference = method == "POST" and not target.startswith("/_emulator/")
            if emu.behaviour.catalog == "stall" and target.split("?")[0] in CATALOG_PATHS:
                await reader.read()  # a model list that never comes
                return
            if inference and (emu.behaviour.stall or (
                    emu.behaviour.stall_after_headers and isinstance(payload, list))):
                if emu.behaviour.stall_after_headers:
                    writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\n"
                                 "transfer-encoding: chunked\r\n\r\n".encode())
                    await writer.drain()
                await reader.read()  # until the caller gives up and closes
                return
            squeeze = emu.behaviour.gzip and "gzip" in headers.get("accept-encoding", "")
            if isinstance(payload, list):  # an event stream: chunked, paced
                z = zlib.compressobj(wbits=31) if squeeze else None  # gzip, flushed per event
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\n"
                             f"{'content-encoding: gzip' + chr(13) + chr(10) if z else ''}"
                             "transfer-encoding: chunked\r\n\r\n".encode())
                sent: list[float] = []
                for i, event in enumerate(payload):
                    if i and i == emu.behaviour.stall_after_events:
                        await reader.read()  # silence until the caller gives up
                        return
                    if i and emu.behaviour.stream_delay_s:
                        await asyncio.sleep(emu.behaviour.stream_delay_s)
                    if i == 1 and emu.behaviour.first_token_delay_s:
                        await asyncio.sleep(emu.behaviour.first_token_delay_s)
                    if z is not None:
                        event = z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH)
                    cut = event.find(b'"completion_tokens"') + 8  # inside the key, if any
                    cut = cut if cut > 8 else len(event) // 2
                    pieces = [event[:cut], event[cut:]] \
                        if emu.behaviour.split_events and len(event) > 1 else [event]
                    for k, piece in enumerate(pieces):
                        if k:
                            await asyncio.sleep(0.05)
                        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        await writer.drain()
                    sent.append(time.monotonic())
                if z is not None:
                    tail = z.flush()
                    writer.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n")
                with emu.lock:
                    emu.stream_sent = sent
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                continue
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            extra = "" if target.startswith("/_emulator/") else \
                "".join(f"{k}: {v}\r\n" for k, v in emu.behaviour.headers.items())
            if squeeze and not target.startswith("/_emulator/"):
                data = gzip.compress(data)
                extra += "content-encoding: gzip\r\n"
            kind = "" if payload == b"" else f"content-type: {ctype or 'application/json'}\r\n"
            head = (f"HTTP/1.1 {status} X\r\n{kind}"
                    f"{extra}content-length: {len(data)}\r\n\r\n").encode()
            if emu.behaviour.reset and not target.startswith("/_emulator/"):
                writer.write(head + data[: len(data) // 2])
                await writer.drain()
                writer.transport.abort()  # a reset mid-response
                return
            writer.write(head + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def start_server(emu: Emulator, host: str, port: int, ssl: Any = None) -> asyncio.Server:
    return await asyncio.start_server(lambda r, w: _serve_conn(emu, r, w), host, port,
                                      reuse_address=True, ssl=ssl)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="TEST TOOL: emulated OpenAI-compatible backend")
    ap.add_argument("--flavour", choices=FLAVOURS, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--models", required=True, help="comma-separated model names")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--api-key-header", default="authorization")
    ap.add_argument("--api-key-scheme", default="Bearer")
    ap.add_argument("--no-record-bodies", action="store_true")
    ap.add_argument("--apis", help="comma-separated APIs served (default: the flavour's)")
    ap.add_argument("--cards", default="{}", help='JSON: per model, what it reports it can do '
                    'and its context, e.g. {"m": {"capabilities": ["completion"], '
                    '"context": 1024}} (a vLLM model without vision or audio is text-only)')
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate (and --tls-key)")
    ap.add_argument("--tls-key")
    a = ap.parse_args(argv)
    ctx = None
    if a.tls_cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
    record = not (a.no_record_bodies or os.environ.get("EMULATOR_NO_RECORD_BODIES"))
    emu = Emulator(a.name, a.flavour, [m for m in a.models.split(",") if m], a.api_key,
                   a.api_key_header.lower(),
                   a.api_key_scheme, record_bodies=record,
                   apis=frozenset(a.apis.split(",")) if a.apis else None,
                   cards=orjson.loads(a.cards))

    if a.flavour == "ocr":
        from .aux_vision import warm_up

        warm_up()  # before listening: whoever waits for the port gets a warm model

    async def run() -> None:
        server = await start_server(emu, a.host, a.port, ctx)
        print(f"emulator {a.name} ({a.flavour}) on {a.host}:{a.port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
