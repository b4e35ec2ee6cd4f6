"""What every endpoint module declares: its paths, how its body carries the model, the error
envelope its clients parse, and, for the APIs that carry conversations, how it reads as (and is
translated to and from) Chat Completions.

The content-part work, capability needs and routing all read Chat Completions; an API with its
own conversation shapes (Responses, Anthropic Messages) shows them a chat view of its body
(``ChatView``) and writes the parts they change back into its own shapes. A backend that lacks
the API is spoken to in Chat Completions: the request is translated, and so is the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

import orjson

from ..errors import refusal


class Api(StrEnum):
    """The APIs a backend may speak (``backends[].apis`` names them)."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    TRANSCRIPTIONS = "transcriptions"
    TRANSLATIONS = "translations"
    SPEECH = "speech"
    IMAGES = "images"
    RERANK = "rerank"
    SCORE = "score"
    OTHER = "other"  # a path in routed_paths that is none of these: passed on as it is


Dialect = Literal["chat", "messages", "responses"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a chat-view part came from in the client's body: the keys that reach it, the same
    as the path a 400 names (``messages[0].content[2]``), and the field holding its media
    (``messages[0].content[2].source.data``), named by errors about the URL or the data."""

    keys: tuple[str | int, ...]
    path: str
    leaf: str = ""


@dataclass(slots=True)
class ChatView:
    """A body read as Chat Completions. ``origins`` maps (message, part) of the view to the
    client's body (absent for a chat body: the view is the body)."""

    data: dict[str, Any]
    origins: dict[tuple[int, int], Origin] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # what the view could not carry


class StreamTranslator(Protocol):
    """Turns a chat-completions event stream, chunk by chunk, into another API's events."""

    def feed(self, chunk: bytes, end: bool) -> bytes: ...


class Translator(Protocol):
    """An API with conversations of its own, spoken to a chat-only backend. Every method is
    pure; ``strict`` translation refuses (400, naming the field) what Chat Completions cannot
    carry, the lenient reading for routing skips it."""

    def to_chat(self, data: dict[str, Any], strict: bool, preset: str) -> ChatView: ...

    def write_back(self, data: dict[str, Any], origin: Origin, part: dict[str, Any]) -> None: ...

    def echo(self, data: dict[str, Any]) -> dict[str, Any]: ...

    def answer(self, chat: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, echo: dict[str, Any]) -> StreamTranslator: ...

    def error(self, status: int, body: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One client-facing path.

    ``form``: a multipart/form-data body, the model a form field (file parts are never
    re-encoded). ``envelope``: the error shape its clients parse. ``dialect``: the
    conversation shapes it carries (content parts are adapted, needs read and answers judged
    in them). ``via``: the API a backend without this one is spoken to in, through
    ``translator``."""

    api: Api
    path: str
    form: bool = False
    envelope: Literal["openai", "anthropic"] = "openai"
    dialect: Dialect | None = None
    via: Api | None = None
    translator: Translator | None = None

    @property
    def translated_tag(self) -> str:
        """What ``x-extproc-translated`` says of an answer translated back (``messages<-chat``)."""
        return f"{self.api.value}<-{self.via.value if self.via else ''}"

    @property
    def suffix(self) -> str:
        """The path under a backend's base path (``/v1`` left out)."""
        return self.path[3:] if self.path.startswith("/v1/") else self.path


def walk_text(blocks: Any) -> Iterator[str]:
    """The text of a list of text-bearing blocks (``text`` keys), skipping anything else."""
    for b in blocks if isinstance(blocks, list) else ():
        if isinstance(b, dict) and isinstance(b.get("text"), str):
            yield b["text"]


def bad_type(param: str, expected: str) -> Exception:
    return refusal(400, f"Invalid type for '{param}': expected {expected}", code="invalid_type",
                   param=param)


def untranslatable(param: str, what: str, api: str) -> Exception:
    """A field a chat-only backend cannot be given: only a backend that speaks ``api`` can."""
    return refusal(400, f"{param}: {what} needs a backend that speaks the {api} API (this "
                   "one is spoken to in Chat Completions)", code="unsupported_for_backend",
                   param=param)


def carry(data: dict[str, Any], chat: dict[str, Any], names: tuple[tuple[str, str], ...]
          ) -> None:
    """Parameters chat takes as they are, under its own names; a stream, with its usage (the
    translated answer reports it)."""
    for ours, theirs in names:
        if data.get(ours) is not None:
            chat[theirs] = data[ours]
    if data.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}


def function_tools(tools: Any, strict: bool, api: str,
                   convert: Callable[[int, dict[str, Any]], dict[str, Any] | None]
                   ) -> list[dict[str, Any]]:
    """Chat's function tools from another API's; ``convert`` gives a tool's function, or None
    for one only a backend of ``api`` runs (refused when translating, else skipped)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_type("tools", "an array")
    out = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_type(f"tools[{k}]", "an object")
        fn = convert(k, tool)
        if fn is None:
            if strict:
                raise untranslatable(f"tools[{k}]", f"the tool {tool.get('type')!r}", api)
            continue
        out.append({"type": "function", "function": fn})
    return out


class SseReader:
    """Splits an event stream into events across chunk boundaries; bounded: an event longer
    than ``limit`` bytes is dropped, never buffered without end."""

    def __init__(self, limit: int = 4 * 1024 * 1024):
        self.buf = b""
        self.limit = limit

    def feed(self, chunk: bytes, end: bool = False) -> list[tuple[str, bytes]]:
        """The complete events so far, as (event name, data)."""
        self.buf += chunk
        out = []
        while True:
            cut = _event_end(self.buf)
            if cut is None:
                break
            raw, self.buf = self.buf[: cut[0]], self.buf[cut[1]:]
            out.append(_event(raw))
        if len(self.buf) > self.limit:
            self.buf = b""
        if end and self.buf.strip():
            out.append(_event(self.buf))
            self.buf = b""
        return out


def _event_end(buf: bytes) -> tuple[int, int] | None:
    best = None
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(sep))
    return best


def _event(raw: bytes) -> tuple[str, bytes]:
    name, data = "", []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


def sse(name: str, payload: bytes) -> bytes:
    """One server-sent event with a name (Anthropic and Responses streams name each)."""
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def chat_calls(msg: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """(id, name, arguments) of each tool call in a chat message, legacy function_call too."""
    out = []
    for tc in msg.get("tool_calls") if isinstance(msg.get("tool_calls"), list) else ():
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            out.append((tc.get("id"), str(fn.get("name") or ""), str(fn.get("arguments") or "")))
    fc = msg.get("function_call")
    if isinstance(fc, dict):
        out.append((None, str(fc.get("name") or ""), str(fc.get("arguments") or "")))
    return out


def answer_id(prefix: str, chat_id: Any) -> str:
    tail = str(chat_id or "gateway").split("-", 1)[-1]
    return prefix + "".join(c for c in tail if c.isalnum())[:48]


def error_message(body: bytes, status: int) -> str:
    """The message of a backend's error body, whatever its shape (OpenAI's, Ollama's, a
    framework's ``detail``, plain text)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:2000] or f"the backend answered {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        for value in (err, data.get("message"), data.get("detail")):
            if isinstance(value, str):
                return value
    return f"the backend answered {status}"


class ChatStream:
    """What translating a chat-completions event stream takes, whatever it becomes: events
    split across chunks, ``[DONE]``, unreadable chunks skipped, each chunk's reasoning, text,
    tool-call and finish deltas handed to the hooks a subclass writes its events in. Never
    raises; after an error event or the end, nothing more is written."""

    def __init__(self, echo: dict[str, Any]):
        self.echo = echo
        self.reader = SseReader()
        self.started = self.stopped = False
        self.usage: dict[str, Any] = {}

    def feed(self, chunk: bytes, end: bool) -> bytes:
        out = []
        for _, data in self.reader.feed(chunk, end):
            if data.strip() == b"[DONE]":
                out.append(self.finish())
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and not self.stopped:
                out.append(self._chunk(event))
        if end:
            out.append(self.finish())
        return b"".join(out)

    def _chunk(self, event: dict[str, Any]) -> bytes:
        if "error" in event:
            self.stopped = True
            return self.on_error(event, error_message(orjson.dumps(event), 500))
        out = self.start(event)
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices") if isinstance(event.get("choices"), list) else []
        for choice in choices[:1]:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += self.on_reasoning(reasoning)
            text = delta.get("content")
            if isinstance(text, str) and text:
                out += self.on_text(text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                    args = fn.get("arguments")
                    out += self.on_tool(f"tool:{call.get('index', 0)}", call.get("id"),
                                        str(fn.get("name") or ""),
                                        args if isinstance(args, str) else "")
            if choice.get("finish_reason") is not None:
                self.on_finish(choice)
        return out

    def finish(self) -> bytes:
        """The stream's end (``[DONE]``, or the body's end without it)."""
        if self.stopped:
            return b""
        self.stopped = True
        return self.start({}) + self.end()

    # The hooks: each returns the bytes it writes.
    def start(self, event: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def on_error(self, event: dict[str, Any], message: str) -> bytes:
        raise NotImplementedError

    def on_reasoning(self, text: str) -> bytes:
        raise NotImplementedError

    def on_text(self, text: str) -> bytes:
        raise NotImplementedError

    def on_tool(self, key: str, call_id: Any, name: str, arguments: str) -> bytes:
        raise NotImplementedError

    def on_finish(self, choice: dict[str, Any]) -> None:
        raise NotImplementedError

    def end(self) -> bytes:
        raise NotImplementedError
