"""Anthropic Messages: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Reads ``model``, ``system``, ``messages`` (text, image, document, tool_use, tool_result
blocks), ``tools``/``tool_choice``, ``output_format``, ``thinking``, ``stream``. Passed through
to a backend that speaks Messages (vLLM, llama.cpp, Ollama) with only ``model`` and the parts
our content work changes rewritten (an image described for a model that cannot see becomes a
text block; a remote image a backend cannot fetch is inlined as a base64 source). Translated
for a chat-only backend: the request to Chat Completions, the answer (whole or streamed) and
errors back to Messages. Token counting has no chat equivalent: native only.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import refusal
from .base import (
    Api,
    ChatStream,
    ChatView,
    Endpoint,
    Origin,
    answer_id,
    bad_type,
    carry,
    chat_calls,
    error_message,
    function_tools,
    sse,
    untranslatable,
    walk_text,
)

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "function_call": "tool_use", "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_envelope(status: int, message: str, extra: dict[str, Any] | None = None) -> bytes:
    """Anthropic's error shape (the SDK raises the matching error class from the status)."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(status),
                                                    "message": message, **(extra or {})}})


class MessagesTranslator:
    """Messages <-> Chat Completions (see the module docstring)."""

    # ------------------------------------------------------------ request

    def to_chat(self, data: dict[str, Any], strict: bool, preset: str) -> ChatView:
        view = ChatView({})
        out: list[dict[str, Any]] = []
        system = data.get("system")
        if isinstance(system, list):
            for k, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise bad_type(f"system[{k}]", "a text block")
            system = "\n\n".join(walk_text(system))
        elif system is not None and not isinstance(system, str):
            raise bad_type("system", "a string or an array of text blocks")
        if system:
            out.append({"role": "system", "content": system})
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise bad_type("messages", "an array of messages")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise bad_type(f"messages[{i}]", "an object")
            role = msg.get("role")
            if role not in ("user", "assistant"):
                raise refusal(400, f"messages[{i}].role: must be 'user' or 'assistant'",
                              code="invalid_value", param=f"messages[{i}].role")
            content = msg.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
            elif not isinstance(content, list):
                raise bad_type(f"messages[{i}].content", "a string or an array of content blocks")
            elif role == "assistant":
                out.append(self._assistant(content, i, strict, view))
            else:
                self._user(content, i, strict, view, out)
        chat: dict[str, Any] = {"model": data.get("model"), "messages": out}
        self._params(data, chat, strict, preset, view)
        view.data = chat
        return view

    def _assistant(self, content: list[Any], i: int, strict: bool, view: ChatView
                   ) -> dict[str, Any]:
        texts, calls = [], []
        for b, block in enumerate(content):
            where = f"messages[{i}].content[{b}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use":
                assert isinstance(block, dict)
                name, args = block.get("name"), block.get("input", {})
                if not isinstance(name, str):
                    raise bad_type(f"{where}.name", "a string")
                calls.append({"id": str(block.get("id") or f"toolu_{i}_{b}"), "type": "function",
                              "function": {"name": name,
                                           "arguments": orjson.dumps(args).decode()}})
            elif kind in ("thinking", "redacted_thinking"):
                view.left_out.append(f"{where}: {kind} (not part of a chat history)")
            elif strict:
                raise untranslatable(where, f"a {kind!r} block", "Messages")
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            msg["tool_calls"] = calls
        return msg

    def _user(self, content: list[Any], i: int, strict: bool, view: ChatView,
              out: list[dict[str, Any]]) -> None:
        """Tool results become tool messages (in order, first), the rest one user message;
        images inside tool results join that user message (chat tool messages carry text)."""
        parts: list[tuple[dict[str, Any], Origin]] = []
        for b, block in enumerate(content):
            where = f"messages[{i}].content[{b}]"
            keys: tuple[str | int, ...] = ("messages", i, "content", b)
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_result":
                assert isinstance(block, dict)
                text: list[str] = []
                inner = block.get("content")
                if isinstance(inner, str):
                    text.append(inner)
                elif isinstance(inner, list):
                    for k, sub in enumerate(inner):
                        part = self._part(sub, f"{where}.content[{k}]",
                                          (*keys, "content", k), strict)
                        if part is None:
                            continue
                        if part[0]["type"] == "text":
                            text.append(part[0]["text"])
                        else:
                            parts.append(part)
                elif inner is not None:
                    raise bad_type(f"{where}.content", "a string or an array of blocks")
                body = "\n".join(text)
                if block.get("is_error"):
                    body = "Error: " + body
                out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": body})
                continue
            part = self._part(block, where, keys, strict)
            if part is not None:
                parts.append(part)
        if parts:
            n = len(out)
            for j, (_, origin) in enumerate(parts):
                view.origins[(n, j)] = origin
            out.append({"role": "user", "content": [p for p, _ in parts]})

    def _part(self, block: Any, where: str, keys: tuple[str | int, ...], strict: bool
              ) -> tuple[dict[str, Any], Origin] | None:
        if not isinstance(block, dict):
            raise bad_type(where, "a content block (an object)")
        kind = block.get("type")
        origin = Origin(keys, where)
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_type(f"{where}.text", "a string")
            return {"type": "text", "text": block["text"]}, origin
        if kind == "image":
            src = block.get("source")
            if not isinstance(src, dict):
                raise bad_type(f"{where}.source", "an object")
            if src.get("type") == "base64":
                mime, data = src.get("media_type"), src.get("data")
                if not isinstance(mime, str) or not isinstance(data, str):
                    raise bad_type(f"{where}.source", "media_type and data strings")
                return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}
                        }, Origin(keys, where, f"{where}.source.data")
            if src.get("type") == "url" and isinstance(src.get("url"), str):
                return {"type": "image_url", "image_url": {"url": src["url"]}}, \
                    Origin(keys, where, f"{where}.source.url")
            if strict:
                raise untranslatable(f"{where}.source", f"an image source of type "
                                      f"{src.get('type')!r}", "Messages")
            return None
        if kind == "document":
            src = block.get("source")
            if not isinstance(src, dict):
                raise bad_type(f"{where}.source", "an object")
            if src.get("type") == "text" and isinstance(src.get("data"), str):
                return {"type": "text", "text": src["data"]}, origin
            if src.get("type") == "content":
                return {"type": "text", "text": "\n".join(walk_text(src.get("content")))}, \
                    origin
            if src.get("type") == "base64" and isinstance(src.get("data"), str):
                mime = src.get("media_type") or "application/pdf"
                return {"type": "file", "file": {
                    "file_data": f"data:{mime};base64,{src['data']}",
                    "filename": str(block.get("title") or "document.pdf")}}, origin
            # A document by URL would be fetched by whoever reads it, outside the fetch
            # policy (the gateway fetches images and audio, not documents); by file id, from
            # a store no backend here has.
            raise refusal(400, f"{where}.source: a document of source type "
                          f"{src.get('type')!r} is not taken here; send it as base64 or text",
                          code="unsupported_content", param=f"{where}.source")
        if strict:
            raise untranslatable(where, f"a {kind!r} block", "Messages")
        return None

    def _params(self, data: dict[str, Any], chat: dict[str, Any], strict: bool, preset: str,
                view: ChatView) -> None:
        carry(data, chat, (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("stop_sequences", "stop")))
        if data.get("top_k") is not None and preset not in ("openai", "azure"):
            chat["top_k"] = data["top_k"]  # OpenAI refuses it; the local servers take it

        def function(k: int, tool: dict[str, Any]) -> dict[str, Any] | None:
            if not isinstance(tool.get("name"), str):
                raise bad_type(f"tools[{k}].name", "a string")
            if tool.get("type") not in (None, "custom"):  # a server tool (web search...)
                return None
            fn = {"name": tool["name"],
                  "parameters": tool.get("input_schema") or {"type": "object"}}
            if isinstance(tool.get("description"), str):
                fn["description"] = tool["description"]
            return fn

        tools = function_tools(data.get("tools"), strict, "Messages", function)
        if tools:
            chat["tools"] = tools
        choice = data.get("tool_choice")
        if choice is not None:
            if not isinstance(choice, dict):
                raise bad_type("tool_choice", "an object")
            kind = choice.get("type")
            if kind == "auto":
                chat["tool_choice"] = "auto"
            elif kind == "any":
                chat["tool_choice"] = "required"
            elif kind == "none":
                chat["tool_choice"] = "none"
            elif kind == "tool" and isinstance(choice.get("name"), str):
                chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            else:
                raise refusal(400, "tool_choice.type: must be auto, any, tool (with a name) or "
                              "none", code="invalid_value", param="tool_choice.type")
            if choice.get("disable_parallel_tool_use") is True:
                chat["parallel_tool_calls"] = False
        fmt = data.get("output_format")
        config = data.get("output_config")
        if fmt is None and isinstance(config, dict):
            fmt = config.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt.get("schema") or {}, "strict": True}}
        elif fmt is not None:
            raise bad_type("output_format", "an object of type json_schema")
        thinking = data.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            budget = thinking.get("budget_tokens")
            chat["reasoning_effort"] = "medium" if not isinstance(budget, int) else \
                "low" if budget < 4096 else "medium" if budget < 16384 else "high"
        if data.get("metadata") is not None:
            view.left_out.append("metadata (Anthropic's user_id has no chat counterpart)")

    def write_back(self, data: dict[str, Any], origin: Origin, part: dict[str, Any]) -> None:
        """Put a part our content work changed back where it came from, as a Messages block:
        a described image as text, a fetched image as a base64 source."""
        target: Any = data
        for key in origin.keys[:-1]:
            target = target[key]
        old = target[origin.keys[-1]]
        new: dict[str, Any]
        if part.get("type") == "text":
            new = {"type": "text", "text": part.get("text", "")}
        elif part.get("type") == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            if url.startswith("data:") and ";base64," in url:
                mime, b64 = url[5:].split(";base64,", 1)
                new = {"type": "image", "source": {"type": "base64", "media_type": mime,
                                                   "data": b64}}
            else:
                new = {"type": "image", "source": {"type": "url", "url": url}}
        else:
            return  # nothing else is changed for Messages backends
        if isinstance(old, dict) and "cache_control" in old:
            new["cache_control"] = old["cache_control"]
        target[origin.keys[-1]] = new

    # ------------------------------------------------------------ answer

    def echo(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"model": data.get("model")}

    def answer(self, chat: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
        choices = chat.get("choices") if isinstance(chat.get("choices"), list) else []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content: list[dict[str, Any]] = []
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = msg.get("content")
        if isinstance(text, list):
            text = "".join(walk_text(text))
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for n, call in enumerate(chat_calls(msg)):
            content.append({"type": "tool_use", "id": call[0] or f"toolu_{n}", "name": call[1],
                            "input": tool_input(call[2])})
        stop_reason, stop_sequence = _stop(choice)
        usage = chat.get("usage") if isinstance(chat.get("usage"), dict) else {}
        return {"id": answer_id("msg_", chat.get("id")), "type": "message", "role": "assistant",
                "model": chat.get("model") or echo.get("model") or "",
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": _usage(usage)}

    def stream(self, echo: dict[str, Any]) -> MessagesStream:
        return MessagesStream(echo)

    def error(self, status: int, body: bytes) -> bytes:
        return error_envelope(status, error_message(body, status))

    # ------------------------------------------------------------ native answers, judged

    @staticmethod
    def read_answer(data: dict[str, Any]) -> dict[str, Any]:
        """A Messages answer as a chat completion, for the capability judge."""
        content = data.get("content") if isinstance(data.get("content"), list) else []
        blocks = [b for b in content if isinstance(b, dict)]
        text = "".join(b["text"] for b in blocks if b.get("type") == "text"
                       and isinstance(b.get("text"), str))
        calls = [{"id": b.get("id"), "type": "function", "function": {
            "name": b.get("name"), "arguments": orjson.dumps(b.get("input", {})).decode()}}
            for b in blocks if b.get("type") == "tool_use"]
        finish = {v: k for k, v in _STOP.items() if k != "function_call"}.get(
            str(data.get("stop_reason")), "stop")
        msg: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            msg["tool_calls"] = calls
        return {"choices": [{"index": 0, "message": msg, "finish_reason": finish}]}

    @staticmethod
    def read_event(data: dict[str, Any]) -> dict[str, Any]:
        """A Messages stream event as a chat chunk, for the stream judge."""
        kind = data.get("type")
        if kind == "error":
            return {"error": data.get("error")}
        delta: dict[str, Any] = {}
        finish = None
        if kind == "content_block_start":
            block = data.get("content_block") if isinstance(data.get("content_block"), dict) \
                else {}
            if block.get("type") == "tool_use":
                delta = {"tool_calls": [{"index": 0, "function": {"name": block.get("name")}}]}
            elif block.get("type") == "text" and block.get("text"):
                delta = {"content": block.get("text")}
        elif kind == "content_block_delta":
            d = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            if d.get("type") == "text_delta":
                delta = {"content": d.get("text")}
        elif kind == "message_delta":
            d = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            if d.get("stop_reason") == "refusal":
                finish = "content_filter"
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Messages carries. Arguments that are not a JSON
    object are kept whole under ``_unparsed_arguments`` rather than lost."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"_unparsed_arguments": arguments}
    return value if isinstance(value, dict) else {"_unparsed_arguments": arguments}


def _stop(choice: dict[str, Any]) -> tuple[str | None, str | None]:
    finish = choice.get("finish_reason")
    if finish is None:
        return None, None
    matched = choice.get("stop_reason")  # vLLM: the stop string that ended the answer
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return _STOP.get(str(finish), "end_turn"), None


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    out = {"input_tokens": int(usage.get("prompt_tokens") or 0),
           "output_tokens": int(usage.get("completion_tokens") or 0)}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens"):
        out["cache_read_input_tokens"] = int(details["cached_tokens"])
    return out


class MessagesStream(ChatStream):
    """Chat chunks in, Anthropic events out: message_start, one content block per text run,
    thinking run or tool call (with input_json_delta), message_delta with the stop reason and
    usage, message_stop."""

    def __init__(self, echo: dict[str, Any]):
        super().__init__(echo)
        self.index = -1
        self.open: str | None = None      # "text", "thinking" or "tool:<n>"
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def _emit(self, name: str, payload: dict[str, Any]) -> bytes:
        return sse(name, orjson.dumps({"type": name, **payload}))

    def start(self, event: dict[str, Any]) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._emit("message_start", {"message": {
            "id": answer_id("msg_", event.get("id")), "type": "message", "role": "assistant",
            "model": event.get("model") or self.echo.get("model") or "", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _block(self, kind: str, block: dict[str, Any]) -> bytes:
        """Open a content block of ``kind`` unless it is the open one."""
        if self.open == kind:
            return b""
        out = self._close()
        self.index += 1
        self.open = kind
        return out + self._emit("content_block_start", {"index": self.index,
                                                       "content_block": block})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return self._emit("content_block_stop", {"index": self.index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._emit("content_block_delta", {"index": self.index, "delta": delta})

    def on_error(self, event: dict[str, Any], message: str) -> bytes:
        return self._emit("error", {"error": {"type": "api_error", "message": message}})

    def on_reasoning(self, text: str) -> bytes:
        return self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""}) \
            + self._delta({"type": "thinking_delta", "thinking": text})

    def on_text(self, text: str) -> bytes:
        return self._block("text", {"type": "text", "text": ""}) + \
            self._delta({"type": "text_delta", "text": text})

    def on_tool(self, key: str, call_id: Any, name: str, arguments: str) -> bytes:
        out = self._block(key, {"type": "tool_use", "id": str(
            call_id or f"toolu_{self.index + 1}"), "name": name, "input": {}})
        if arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    def on_finish(self, choice: dict[str, Any]) -> None:
        self.stop_reason, self.stop_sequence = _stop(choice)

    def end(self) -> bytes:
        return self._close() + self._emit("message_delta", {
            "delta": {"stop_reason": self.stop_reason or "end_turn",
                      "stop_sequence": self.stop_sequence},
            "usage": _usage(self.usage)}) + self._emit("message_stop", {})


TRANSLATOR = MessagesTranslator()

ENDPOINTS = (Endpoint(Api.MESSAGES, "/v1/messages", envelope="anthropic", dialect="messages",
                      via=Api.CHAT, translator=TRANSLATOR),
             Endpoint(Api.COUNT_TOKENS, "/v1/messages/count_tokens", envelope="anthropic"))
