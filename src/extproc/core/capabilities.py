"""Capabilities: what a request needs and forces, candidate ordering, and response judging.

Rules (docs/capabilities.md):
- needs: tools (non-empty ``tools``/``functions``), vision/audio (parts), json
  (``response_format`` json_object/json_schema), reasoning (``reasoning_effort``/``reasoning``);
- forced: tools when ``tool_choice`` is "required", names a function, or ``allowed_tools`` is
  required, or legacy ``function_call`` names one; json when ``response_format`` asks for it;
- a 200 that fails a forced need is a retry signal; a body that cannot be parsed as a chat
  completion is never judged (no failover on doubt); ``tool_choice`` auto/none never retries.
Pure functions only: the attempt stage feeds bytes in and acts on the verdicts.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from .endpoints import Dialect
from .endpoints.messages import MessagesTranslator
from .endpoints.responses import ResponsesTranslator
from .errors import refusal
from .parts import Sig

# Answers in other APIs' shapes, read as chat completions for the judge.
_ANSWER_READERS = {"messages": MessagesTranslator.read_answer,
                   "responses": ResponsesTranslator.read_answer}
_EVENT_READERS = {"messages": MessagesTranslator.read_event,
                  "responses": ResponsesTranslator.read_event}


@dataclass(slots=True)
class Needs:
    needed: set[str] = field(default_factory=set)
    forced: set[str] = field(default_factory=set)
    tool_name: str | None = None          # a forced, named function
    schema: dict[str, Any] | None = None  # json_schema to validate against
    bad: set[str] = field(default_factory=set)  # bad answers that move on (fallback_on)

    @property
    def judged(self) -> bool:
        """Whether a 200 is judged at all (and a stream held until it decides)."""
        return bool(self.forced or self.bad)

    def encode(self) -> str:
        return orjson.dumps({"needed": sorted(self.needed), "forced": sorted(self.forced),
                             "tool": self.tool_name, "schema": self.schema,
                             "bad": sorted(self.bad)}).decode()

    @classmethod
    def decode(cls, raw: str) -> Needs:
        d = orjson.loads(raw)
        return cls(set(d.get("needed") or ()), set(d.get("forced") or ()), d.get("tool"),
                   d.get("schema"), set(d.get("bad") or ()))


def _shape(value: Any, param: str, expected: str, *types: type) -> Any:
    """``value`` when it is None or of ``types``; else a 400 naming the field."""
    if value is not None and not isinstance(value, types):
        raise refusal(400, f"Invalid type for '{param}': expected {expected}",
                      code="invalid_type", param=param)
    return value


def request_needs(data: dict[str, Any], sigs: list[Sig], max_schema_bytes: int = 65536) -> Needs:
    """What the request needs and forces. Raises Refusal when a field read here has the
    wrong shape. A ``json_schema`` over ``max_schema_bytes`` is not carried: such answers are
    judged as JSON only (the schema travels to the attempt stage in Envoy's metadata)."""
    n = Needs()
    tools = _shape(data.get("tools"), "tools", "an array", list) or \
        _shape(data.get("functions"), "functions", "an array", list)
    if tools:
        n.needed.add("tools")
        choice = _shape(data.get("tool_choice"), "tool_choice", "a string or an object",
                        str, dict)
        if choice == "required":
            n.forced.add("tools")
        elif isinstance(choice, dict):
            kind = _shape(choice.get("type"), "tool_choice.type", "a string", str)
            if kind == "allowed_tools":
                allowed = _shape(choice.get("allowed_tools"), "tool_choice.allowed_tools",
                                 "an object", dict) or {}
                if allowed.get("mode") == "required":
                    n.forced.add("tools")
            else:
                fn = _shape(choice.get("function"), "tool_choice.function", "an object",
                            dict) or {}
                name = _shape(fn.get("name"), "tool_choice.function.name", "a string", str) \
                    or _shape(choice.get("name"), "tool_choice.name", "a string", str)
                if name:
                    n.forced.add("tools")
                    n.tool_name = name
        fc = _shape(data.get("function_call"), "function_call", "a string or an object",
                    str, dict)
        if isinstance(fc, dict):
            name = _shape(fc.get("name"), "function_call.name", "a string", str)
            if name:
                n.forced.add("tools")
                n.tool_name = name
    rf = _shape(data.get("response_format"), "response_format", "an object", dict)
    if rf is not None and _shape(rf.get("type"), "response_format.type", "a string", str) in (
            "json_object", "json_schema"):
        n.needed.add("json")
        n.forced.add("json")
        if rf.get("type") == "json_schema":
            js = _shape(rf.get("json_schema"), "response_format.json_schema", "an object", dict)
            schema = _shape((js or {}).get("schema"), "response_format.json_schema.schema",
                            "an object", dict, bool)
            if isinstance(schema, dict) and len(orjson.dumps(schema)) <= max_schema_bytes:
                n.schema = schema
    if data.get("reasoning_effort") is not None or data.get("reasoning") is not None:
        n.needed.add("reasoning")
    kinds = {s.kind for s in sigs}
    if "image" in kinds:
        n.needed.add("vision")
    if "audio" in kinds:
        n.needed.add("audio")
    return n


@dataclass(frozen=True, slots=True)
class Caps:
    """What a model can do. ``present``: what it has; ``known``: the capabilities whose
    presence is known (None: every one, as when the config lists them; a backend reports only
    some, e.g. llama.cpp its modalities); ``detected``: reported by the backend, not declared."""

    present: frozenset[str] = frozenset()
    known: frozenset[str] | None = frozenset()
    detected: bool = False

    def has(self, capability: str) -> bool:
        return capability in self.present

    def lacks(self, capability: str) -> bool:
        """Known to be absent (never merely unknown)."""
        return capability not in self.present and (self.known is None or
                                                   capability in self.known)


UNKNOWN = Caps()


def rank(caps: Caps, needed: set[str], substitutable: set[str]) -> int:
    """0: every need present; 1: some unknown or substitutable; 2: some need known absent."""
    missing = needed - caps.present
    if not missing:
        return 0
    return 2 if any(caps.lacks(c) for c in missing - substitutable) else 1


# ---------------------------------------------------------------- response judging

@dataclass(frozen=True, slots=True)
class Verdict:
    """A judgement. Reasons name what failed, never the answer's text: they become a
    response header and log lines, and the answer is model output."""

    ok: bool | None       # None: could not judge (pass through)
    reason: str = ""
    # JSON texts that still have to match the request's json_schema: a check of untrusted
    # work done off the event loop (schema_judge.py), so not here.
    schema_values: tuple[str, ...] = ()


PASS, UNJUDGED = Verdict(True), Verdict(None)


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def judge_completion(body: bytes, needs: Needs, dialect: Dialect = "chat") -> Verdict:
    """Judge a whole chat.completion body (or another API's answer, read as one) against the
    forced needs, then the bad-answer rules the model opted into (``needs.bad``)."""
    try:
        data = orjson.loads(body)
        if dialect != "chat":
            data = _ANSWER_READERS[dialect](data) if isinstance(data, dict) else None
        choices = data["choices"]
        if not isinstance(choices, list) or not choices:
            return Verdict(False, "no_choices: the answer has no choices") \
                if "no_choices" in needs.bad and choices in ([], None) else UNJUDGED
        messages = [c["message"] for c in choices]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return UNJUDGED
    if not all(isinstance(c, dict) for c in choices) or \
            not all(isinstance(m, dict) for m in messages):
        return UNJUDGED  # not shaped like a chat completion: never fail over on doubt
    if "tools" in needs.forced:
        calls = [tc for m in messages for tc in _list(m.get("tool_calls"))
                 if isinstance(tc, dict)]
        legacy = [m["function_call"] for m in messages if isinstance(m.get("function_call"), dict)]
        names = [_dict(tc.get("function")).get("name") for tc in calls] + \
            [f.get("name") for f in legacy]
        if not names:
            truncated = any(c.get("finish_reason") == "length" for c in choices)
            return Verdict(False, "tools: truncated before a tool call" if truncated
                           else "tools: forced, but the answer has no tool call")
        if needs.tool_name and needs.tool_name not in names:
            return Verdict(False, f"tools: called another function than the forced "
                                  f"{needs.tool_name!r}")
    if "json" in needs.forced:
        values = []
        for c, m in zip(choices, messages, strict=True):
            content = m.get("content")
            if not isinstance(content, str):
                continue
            try:
                orjson.loads(content)
            except orjson.JSONDecodeError:
                if c.get("finish_reason") == "length":
                    return Verdict(False, "json: truncated (finish_reason length)")
                return Verdict(False, "json: content is not valid JSON")
            values.append(content)
        if needs.schema is not None and values:
            bad = _bad_answer(choices, messages, needs.bad)
            return bad or Verdict(True, schema_values=tuple(values))
    return _bad_answer(choices, messages, needs.bad) or PASS


def _bad_answer(choices: list[Any], messages: list[dict[str, Any]], rules: set[str]
                ) -> Verdict | None:
    """The first bad-answer rule (of those opted into) a whole answer breaks. Only what a
    rule names fails: prose where tools were merely offered is an answer."""
    if not rules:
        return None
    if "content_filter" in rules and any(c.get("finish_reason") == "content_filter"
                                         for c in choices):
        return Verdict(False, "content_filter: the answer was filtered")
    calls = [tc for m in messages for tc in _list(m.get("tool_calls")) if isinstance(tc, dict)]
    if "invalid_tool_arguments" in rules:
        for tc in calls:
            args = _dict(tc.get("function")).get("arguments")
            try:
                orjson.loads(args if isinstance(args, str) else b"")
            except orjson.JSONDecodeError:
                return Verdict(False, "invalid_tool_arguments: a tool call's arguments are "
                                      "not JSON")
    if "empty_answer" in rules and not calls and not any(
            isinstance(m.get("function_call"), dict) for m in messages) and not any(
            isinstance(m.get("content"), str) and m["content"].strip() for m in messages):
        return Verdict(False, "empty_answer: no content and no tool call")
    return None


class StreamJudge:
    """Judges an SSE chat stream incrementally; decides at the first deciding event.

    tools forced: a ``tool_calls`` delta passes (if the name matches), text content fails.
    json forced: the first non-blank content character must open a JSON value.
    Otherwise the first content or tool-call delta passes; a stream that ends or errors
    before it (or is filtered) fails only where the model opted into that rule.
    """

    def __init__(self, needs: Needs, dialect: Dialect = "chat"):
        self.needs = needs
        self.buf = b""
        self.verdict: Verdict | None = None
        self.read_event = _EVENT_READERS.get(dialect)

    def feed(self, chunk: bytes, end: bool = False) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        self.buf += chunk
        while self.verdict is None:
            sep = re.search(rb"\r?\n\r?\n", self.buf)
            if sep is None:
                break
            event, self.buf = self.buf[: sep.start()], self.buf[sep.end():]
            self.verdict = self._event(event)
        if self.verdict is None and end:
            if self.buf.strip():
                self.verdict = self._event(self.buf)
            if self.verdict is None:
                self.verdict = Verdict(False, "stream ended without a tool call") \
                    if "tools" in self.needs.forced else self._no_content("ended")
        return self.verdict

    def _no_content(self, how: str) -> Verdict:
        return Verdict(False, f"stream_without_content: the stream {how} before any content") \
            if "stream_without_content" in self.needs.bad else UNJUDGED

    def _event(self, event: bytes) -> Verdict | None:
        """The verdict an event decides: the first content or tool-call delta decides (held
        streams are released at it), what comes before it does not."""
        data = b"".join(line[5:].strip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return None
        try:
            chunk = _dict(orjson.loads(data))
            if self.read_event is not None:
                chunk = self.read_event(chunk)
            choices = _list(chunk.get("choices"))
            deltas = [_dict(_dict(c).get("delta")) for c in choices]
        except orjson.JSONDecodeError:
            return UNJUDGED
        if "error" in chunk:  # an error event, before any content
            return self._no_content("errored")
        for d in deltas:
            calls = [c for c in _list(d.get("tool_calls")) if isinstance(c, dict)] or \
                ([d["function_call"]] if isinstance(d.get("function_call"), dict) else [])
            if calls:
                name = _dict(calls[0].get("function")).get("name") or calls[0].get("name")
                if "tools" in self.needs.forced and self.needs.tool_name and name and \
                        name != self.needs.tool_name:
                    return Verdict(False, f"tools: called another function than the forced "
                                          f"{self.needs.tool_name!r}")
                return PASS
            text = d.get("content")
            if isinstance(text, str) and text.strip():
                if "tools" in self.needs.forced:
                    return Verdict(False, "tools: forced, but the stream started with text")
                if "json" in self.needs.forced:
                    return PASS if text.lstrip()[0] in "{[" else Verdict(
                        False, "json: the stream started with prose, not JSON")
                return PASS
        if "content_filter" in self.needs.bad and any(
                _dict(c).get("finish_reason") == "content_filter" for c in choices):
            return Verdict(False, "content_filter: the stream was filtered before any content")
        return None


# ---------------------------------------------------------------- compressed answers

# What the judge can read. A judged request asks the backend for these only (the client's
# Accept-Encoding, narrowed), so the answer can be judged and still reach the client in an
# encoding it asked for.
READABLE_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def readable_accept_encoding(value: str) -> str | None:
    """The client's Accept-Encoding with only the codings the judge reads; None: none left."""
    keep = [item.strip() for item in value.split(",")
            if item.split(";", 1)[0].strip().lower() in READABLE_ENCODINGS]
    return ", ".join(keep) or None


class Inflater:
    """A gzip or deflate answer decompressed for the judge (the client gets the bytes as the
    backend sent them). At most ``limit`` bytes come out: a decompression bomb is unjudged,
    never held whole."""

    def __init__(self, encoding: str, limit: int):
        self.z = zlib.decompressobj(31 if encoding in ("gzip", "x-gzip") else 47)
        self.left = limit
        self.failed = False

    def feed(self, chunk: bytes) -> bytes | None:
        """The next decompressed bytes; None once the answer is corrupt or over the limit."""
        if self.failed:
            return None
        try:
            out = self.z.decompress(chunk, self.left + 1)
        except zlib.error:
            out = None
        if out is None or len(out) > self.left or self.z.unconsumed_tail:
            self.failed = True
            return None
        self.left -= len(out)
        return out


class AnswerHold:
    """An answer held while it is judged, or kept whole for failover. Fed its body chunk by
    chunk, it gives the verdict once the body decides it (a stream: its first deciding event;
    otherwise: the whole body); bounded by bytes and time, past either the answer passes
    unjudged. ``held`` counts the chunks Envoy waits to release."""

    def __init__(self, needs: Needs | None, status: int, stream: bool, inflate: str | None,
                 max_bytes: int, max_s: float, now: float, dialect: Dialect = "chat",
                 whole_limit: int | None = None):
        self.needs, self.status, self.dialect = needs, status, dialect
        self.judge = StreamJudge(needs, dialect) if needs is not None and status == 200 and \
            stream else None
        # An answer to translate is kept whole (up to ``whole_limit``), judged or not.
        self.whole_limit = whole_limit
        self.inflater = Inflater(inflate, max_bytes) if inflate else None
        self.body = bytearray()
        self.held = 0
        self.since, self.max_bytes, self.max_s = now, max_bytes, max_s

    def feed(self, chunk: bytes, end: bool, now: float) -> Verdict | None:
        self.held += 1
        verdict: Verdict | None = None
        body = chunk if self.inflater is None else self.inflater.feed(chunk)
        if body is None:
            verdict = UNJUDGED  # corrupt, or it inflates past the limit
        elif self.judge is not None:
            verdict = self.judge.feed(body, end)
        else:
            self.body += body
            if end:
                verdict = self._whole(bytes(self.body))
        limit = self.max_bytes if self.whole_limit is None else self.whole_limit
        if verdict is None and (len(self.body) > limit or (
                self.whole_limit is None and now - self.since > self.max_s)
                or (self.judge is not None and len(self.judge.buf) > self.max_bytes)):
            verdict = UNJUDGED  # bounded: release what is held, never fail on doubt
        return verdict

    def _whole(self, body: bytes) -> Verdict:
        if self.needs is None:
            return UNJUDGED  # held only to be complete before the router sees it
        if self.status == 200:
            return judge_completion(body, self.needs, self.dialect)
        gap = capability_gap(self.status, body)
        return Verdict(False, f"{gap}: the backend's error says the model lacks it") if gap \
            else UNJUDGED


# Error answers that are capability gaps, not transient faults (docs/content-parts.md).
_GAPS = [
    (re.compile(r"is not a multimodal model", re.I), "vision"),
    (re.compile(r"image input is not supported", re.I), "vision"),
    (re.compile(r"does not support (image|vision)", re.I), "vision"),
    (re.compile(r"missing data required for image input", re.I), "vision"),
    (re.compile(r"audio input is not supported|does not support audio", re.I), "audio"),
    (re.compile(r"does not support tools|tools? (is|are) not supported|"
                r"tool[_ ]choice.*not supported", re.I), "tools"),
    (re.compile(r"response_format.*not supported|does not support (json|structured)", re.I),
     "json"),
]


def capability_gap(status: int, body: bytes) -> str | None:
    """The capability an error answer says is missing, if it says so."""
    if status < 400 or not body:
        return None
    text = body[:8192].decode("utf-8", "replace")
    for pattern, cap in _GAPS:
        if pattern.search(text):
            return cap
    return None
