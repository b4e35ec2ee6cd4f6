"""What every endpoint module declares: its paths, how its body carries the model, the error
envelope its clients parse, and, for the APIs that carry conversations, how it reads as (and is
translated to and from) Chat Completions.

The content-part work, capability needs and routing all read Chat Completions; an API with its
own conversation shapes (Responses, Anthropic Messages) shows them a chat view of its body
(``ChatView``) and writes the parts they change back into its own shapes. A backend that lacks
the API is spoken to in Chat Completions: the request is translated, and so is the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol


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
    def suffix(self) -> str:
        """The path under a backend's base path (``/v1`` left out)."""
        return self.path[3:] if self.path.startswith("/v1/") else self.path


def walk_text(blocks: Any) -> Iterator[str]:
    """The text of a list of text-bearing blocks (``text`` keys), skipping anything else."""
    for b in blocks if isinstance(blocks, list) else ():
        if isinstance(b, dict) and isinstance(b.get("text"), str):
            yield b["text"]


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
