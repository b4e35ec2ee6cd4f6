"""OpenAI Responses: ``/v1/responses``.

Reads ``model``, ``instructions``, ``input`` (messages with input_text, input_image,
input_audio, input_file parts; function_call and function_call_output items), ``tools``/
``tool_choice``, ``text.format``, ``reasoning``, ``metadata`` (routing hints), ``stream``.
Passed through to a backend that speaks Responses (OpenAI, vLLM, llama.cpp, Ollama) with only
``model`` and the parts our content work changes rewritten. Translated for a chat-only backend:
the request to Chat Completions, the answer (whole, or streamed as Responses events) back.
Stateful features (``previous_response_id``, ``conversation``, item references) and hosted
tools need a backend that speaks Responses: translating them is refused, naming the field.
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
    function_tools,
    sse,
    untranslatable,
    walk_text,
)

_STATEFUL = ("previous_response_id", "conversation", "prompt")
_ECHOED = ("instructions", "max_output_tokens", "parallel_tool_calls", "reasoning",
           "temperature", "text", "tool_choice", "tools", "top_p", "metadata")


class ResponsesTranslator:
    """Responses <-> Chat Completions (see the module docstring)."""

    # ------------------------------------------------------------ request

    def to_chat(self, data: dict[str, Any], strict: bool, preset: str) -> ChatView:
        view = ChatView({})
        if strict:
            for key in _STATEFUL:
                if data.get(key) is not None:
                    raise untranslatable(key, f"'{key}'", "Responses")
        out: list[dict[str, Any]] = []
        instructions = data.get("instructions")
        if isinstance(instructions, str) and instructions:
            out.append({"role": "system", "content": instructions})
        elif instructions is not None and not isinstance(instructions, str):
            raise bad_type("instructions", "a string")
        items = data.get("input")
        if isinstance(items, str):
            out.append({"role": "user", "content": items})
        elif isinstance(items, list):
            for i, item in enumerate(items):
                self._item(item, i, strict, view, out)
        elif items is not None:
            raise bad_type("input", "a string or an array of input items")
        chat: dict[str, Any] = {"model": data.get("model"), "messages": out}
        self._params(data, chat, strict)
        view.data = chat
        return view

    def _item(self, item: Any, i: int, strict: bool, view: ChatView,
              out: list[dict[str, Any]]) -> None:
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_type(where, "an input item (an object)")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise refusal(400, f"{where}.role: must be user, assistant, system or developer",
                              code="invalid_value", param=f"{where}.role")
            role = "system" if role == "developer" else role
            content = item.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                return
            if not isinstance(content, list):
                raise bad_type(f"{where}.content", "a string or an array of content parts")
            if role != "user":
                out.append({"role": role, "content": "".join(
                    str(p.get("text") if p.get("type") in ("output_text", "input_text")
                        else p.get("refusal") or "") for p in content if isinstance(p, dict))})
                return
            parts = []
            for k, raw in enumerate(content):
                part = self._part(raw, f"{where}.content[{k}]", ("input", i, "content", k),
                                  strict)
                if part is not None:
                    view.origins[(len(out), len(parts))] = part[1]
                    parts.append(part[0])
            out.append({"role": "user", "content": parts})
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str):
                raise bad_type(f"{where}.name", "a string")
            call = {"id": str(item.get("call_id") or item.get("id") or f"call_{i}"),
                    "type": "function", "function": {"name": name, "arguments": str(
                        item.get("arguments") or "{}")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(walk_text(output))
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": output if isinstance(output, str) else
                        orjson.dumps(output).decode()})
        elif kind == "reasoning":
            view.left_out.append(f"{where}: reasoning (not part of a chat history)")
        elif strict:
            raise untranslatable(where, f"an input item of type {kind!r}", "Responses")

    def _part(self, raw: Any, where: str, keys: tuple[str | int, ...], strict: bool
              ) -> tuple[dict[str, Any], Origin] | None:
        if not isinstance(raw, dict):
            raise bad_type(where, "a content part (an object)")
        kind = raw.get("type")
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(raw.get("text"), str):
                raise bad_type(f"{where}.text", "a string")
            return {"type": "text", "text": raw["text"]}, Origin(keys, where)
        if kind == "input_image":
            url = raw.get("image_url")
            if isinstance(url, str):
                image: dict[str, Any] = {"url": url}
                if isinstance(raw.get("detail"), str):
                    image["detail"] = raw["detail"]
                return {"type": "image_url", "image_url": image}, \
                    Origin(keys, where, f"{where}.image_url")
            if strict:
                raise untranslatable(where, "an image by file_id", "Responses")
            return None
        if kind == "input_audio":
            audio = raw.get("input_audio")
            if not isinstance(audio, dict):
                raise bad_type(f"{where}.input_audio", "an object")
            return {"type": "input_audio", "input_audio": audio}, \
                Origin(keys, where, f"{where}.input_audio.data")
        if kind == "input_file":
            if isinstance(raw.get("file_data"), str):
                data = raw["file_data"]
                if not data.startswith("data:"):
                    data = f"data:application/pdf;base64,{data}"
                return {"type": "file", "file": {"file_data": data, "filename": str(
                    raw.get("filename") or "file.pdf")}}, Origin(keys, where)
            if raw.get("file_url") is not None:  # fetched by whoever reads it: not here
                raise refusal(400, f"{where}.file_url: files by URL are not taken here (they "
                              "would be fetched outside the fetch policy); send file_data",
                              code="unsupported_content", param=f"{where}.file_url")
            if strict:
                raise untranslatable(where, "a file by file_id", "Responses")
            return None
        if strict:
            raise untranslatable(where, f"a content part of type {kind!r}", "Responses")
        return None

    def _params(self, data: dict[str, Any], chat: dict[str, Any], strict: bool) -> None:
        carry(data, chat, (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"),
                           ("user", "user"), ("metadata", "metadata")))

        def function(k: int, tool: dict[str, Any]) -> dict[str, Any] | None:
            if tool.get("type") != "function":  # hosted (web_search, file_search...)
                return None
            if not isinstance(tool.get("name"), str):
                raise bad_type(f"tools[{k}].name", "a string")
            fn = {"name": tool["name"], "parameters": tool.get("parameters") or
                  {"type": "object"}}
            for key in ("description", "strict"):
                if tool.get(key) is not None:
                    fn[key] = tool[key]
            return fn

        tools = function_tools(data.get("tools"), strict, "Responses", function)
        if tools:
            chat["tools"] = tools
        choice = data.get("tool_choice")
        if isinstance(choice, str):
            chat["tool_choice"] = choice
        elif isinstance(choice, dict):
            if choice.get("type") == "function" and isinstance(choice.get("name"), str):
                chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            elif choice.get("type") == "allowed_tools":
                chat["tool_choice"] = {"type": "allowed_tools", "allowed_tools": {
                    "mode": choice.get("mode", "auto"), "tools": [
                        {"type": "function", "function": {"name": t.get("name")}}
                        for t in choice.get("tools") or () if isinstance(t, dict)]}}
            elif strict:
                raise untranslatable("tool_choice", f"a tool choice of type "
                                      f"{choice.get('type')!r}", "Responses")
        elif choice is not None:
            raise bad_type("tool_choice", "a string or an object")
        text = data.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict):
            if fmt.get("type") == "json_schema":
                schema = {k: fmt[k] for k in ("name", "schema", "strict", "description")
                          if k in fmt}
                schema.setdefault("name", "output")
                chat["response_format"] = {"type": "json_schema", "json_schema": schema}
            elif fmt.get("type") == "json_object":
                chat["response_format"] = {"type": "json_object"}
        reasoning = data.get("reasoning")
        if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
            chat["reasoning_effort"] = reasoning["effort"]

    def write_back(self, data: dict[str, Any], origin: Origin, part: dict[str, Any]) -> None:
        target: Any = data
        for key in origin.keys[:-1]:
            target = target[key]
        old = target[origin.keys[-1]]
        if part.get("type") == "text":
            new: dict[str, Any] = {"type": "input_text", "text": part.get("text", "")}
        elif part.get("type") == "image_url":
            image = part.get("image_url") or {}
            new = {"type": "input_image", "image_url": image.get("url")}
            detail = image.get("detail") or (old.get("detail") if isinstance(old, dict) else None)
            if detail:
                new["detail"] = detail
        elif part.get("type") == "input_audio":
            new = {"type": "input_audio", "input_audio": part.get("input_audio")}
        else:
            return
        target[origin.keys[-1]] = new

    # ------------------------------------------------------------ answer

    def echo(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"model": data.get("model"), **{k: data[k] for k in _ECHOED if k in data}}

    def answer(self, chat: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
        choices = chat.get("choices") if isinstance(chat.get("choices"), list) else []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        rid = answer_id("resp_", chat.get("id"))
        output: list[dict[str, Any]] = []
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            output.append(_reasoning_item(rid, reasoning, "completed"))
        text = msg.get("content")
        if isinstance(text, list):
            text = "".join(walk_text(text))
        if isinstance(text, str) and text:
            output.append(_message_item(rid, text, "completed"))
        for n, (call_id, name, args) in enumerate(chat_calls(msg)):
            output.append(_call_item(rid, n, call_id, name, args, "completed"))
        usage = chat.get("usage") if isinstance(chat.get("usage"), dict) else {}
        return _response(rid, chat.get("created"), chat.get("model"), echo, output,
                         choice.get("finish_reason"), usage)

    def stream(self, echo: dict[str, Any]) -> ResponsesStream:
        return ResponsesStream(echo)

    def error(self, status: int, body: bytes) -> bytes:
        return body  # the OpenAI error envelope already

    # ------------------------------------------------------------ native answers, judged

    @staticmethod
    def read_answer(data: dict[str, Any]) -> dict[str, Any]:
        """A Responses answer as a chat completion, for the capability judge."""
        items = [o for o in data.get("output") or () if isinstance(o, dict)]
        text = "".join(c.get("text", "") for o in items if o.get("type") == "message"
                       for c in o.get("content") or () if isinstance(c, dict)
                       and c.get("type") == "output_text" and isinstance(c.get("text"), str))
        calls = [{"id": o.get("call_id"), "type": "function", "function": {
            "name": o.get("name"), "arguments": o.get("arguments")}}
            for o in items if o.get("type") == "function_call"]
        reason = (data.get("incomplete_details") or {}).get("reason") \
            if isinstance(data.get("incomplete_details"), dict) else None
        finish = "length" if reason == "max_output_tokens" else \
            "content_filter" if reason == "content_filter" else \
            "tool_calls" if calls else "stop"
        msg: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            msg["tool_calls"] = calls
        return {"choices": [{"index": 0, "message": msg, "finish_reason": finish}]}

    @staticmethod
    def read_event(data: dict[str, Any]) -> dict[str, Any]:
        """A Responses stream event as a chat chunk, for the stream judge."""
        kind = data.get("type")
        if kind in ("error", "response.failed"):
            return {"error": data.get("error") or data.get("response")}
        delta: dict[str, Any] = {}
        finish = None
        if kind == "response.output_item.added":
            item = data.get("item") if isinstance(data.get("item"), dict) else {}
            if item.get("type") == "function_call":
                delta = {"tool_calls": [{"index": 0, "function": {"name": item.get("name")}}]}
        elif kind in ("response.output_text.delta", "response.refusal.delta"):
            delta = {"content": data.get("delta")}
        elif kind == "response.incomplete":
            response = data.get("response") if isinstance(data.get("response"), dict) else {}
            details = response.get("incomplete_details") or {}
            if isinstance(details, dict) and details.get("reason") == "content_filter":
                finish = "content_filter"
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _message_item(rid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + rid[5:], "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}] if status == "completed" or text else []}


def _call_item(rid: str, n: int, call_id: str | None, name: str, args: str, status: str
               ) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{rid[5:]}_{n}",
            "call_id": call_id or f"call_{rid[5:]}_{n}", "name": name, "arguments": args,
            "status": status}


def _reasoning_item(rid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": "rs_" + rid[5:], "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _response(rid: str, created: Any, model: Any, echo: dict[str, Any],
              output: list[dict[str, Any]], finish: Any, usage: dict[str, Any],
              status: str | None = None) -> dict[str, Any]:
    incomplete = {"length": {"reason": "max_output_tokens"},
                  "content_filter": {"reason": "content_filter"}}.get(str(finish))
    if status is None:
        status = "incomplete" if incomplete else "completed"
    details = usage.get("completion_tokens_details")
    cached = usage.get("prompt_tokens_details")
    text = echo.get("text") if isinstance(echo.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": rid, "object": "response", "created_at": int(created or 0), "status": status,
        "error": None, "incomplete_details": incomplete if status == "incomplete" else None,
        "instructions": echo.get("instructions"), "max_output_tokens":
        echo.get("max_output_tokens"), "model": model or echo.get("model") or "",
        "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": None, "reasoning": echo.get("reasoning") or
        {"effort": None, "summary": None}, "store": False,
        "temperature": echo.get("temperature"), "text": text,
        "tool_choice": echo.get("tool_choice", "auto"), "tools": echo.get("tools") or [],
        "top_p": echo.get("top_p"), "truncation": "disabled",
        "metadata": echo.get("metadata") or {},
        "usage": None if not usage else {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "input_tokens_details": {"cached_tokens": int(
                (cached or {}).get("cached_tokens") or 0) if isinstance(cached, dict) else 0,
                "cache_write_tokens": 0},
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "output_tokens_details": {"reasoning_tokens": int(
                (details or {}).get("reasoning_tokens") or 0) if isinstance(details, dict)
                else 0},
            "total_tokens": int(usage.get("total_tokens") or 0)},
    }


class ResponsesStream(ChatStream):
    """Chat chunks in, Responses events out: response.created and .in_progress, one output
    item per text run, reasoning run or function call (added, deltas, done), then
    response.completed (or .incomplete) with the whole response."""

    def __init__(self, echo: dict[str, Any]):
        super().__init__(echo)
        self.seq = 0
        self.rid = ""
        self.created: Any = 0
        self.model: Any = None
        self.items: list[dict[str, Any]] = []     # finished output items
        self.open: dict[str, Any] | None = None   # the item being streamed
        self.open_key: str | None = None
        self.acc = ""                             # the open item's text so far
        self.finish_reason: Any = None

    def _emit(self, name: str, payload: dict[str, Any]) -> bytes:
        self.seq += 1
        return sse(name, orjson.dumps({"type": name, "sequence_number": self.seq - 1,
                                       **payload}))

    def _snapshot(self, status: str) -> dict[str, Any]:
        return _response(self.rid, self.created, self.model, self.echo, list(self.items),
                         self.finish_reason, self.usage if status != "in_progress" else {},
                         status)

    def start(self, event: dict[str, Any]) -> bytes:
        if self.started:
            return b""
        self.started = True
        self.rid = answer_id("resp_", event.get("id"))
        self.created, self.model = event.get("created"), event.get("model")
        snap = self._snapshot("in_progress")
        return self._emit("response.created", {"response": snap}) + \
            self._emit("response.in_progress", {"response": snap})

    def _item(self, key: str, item: dict[str, Any]) -> bytes:
        """Open an output item for ``key`` unless it is the open one."""
        if self.open_key == key:
            return b""
        out = self._close()
        self.open, self.open_key, self.acc = item, key, ""
        out += self._emit("response.output_item.added", {"output_index": len(self.items),
                                                         "item": item})
        if item["type"] == "message":
            out += self._emit("response.content_part.added", {
                "item_id": item["id"], "output_index": len(self.items), "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        return out

    def _close(self) -> bytes:
        item = self.open
        if item is None:
            return b""
        self.open = self.open_key = None
        index, text = len(self.items), self.acc
        where = {"item_id": item["id"], "output_index": index}
        out = b""
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._emit("response.output_text.done", {**where, "content_index": 0,
                                                            "text": text, "logprobs": []})
            out += self._emit("response.content_part.done", {**where, "content_index": 0,
                                                             "part": part})
            item["content"] = [part]
        elif item["type"] == "function_call":
            out += self._emit("response.function_call_arguments.done", {
                **where, "name": item["name"], "arguments": item["arguments"]})
        else:  # reasoning
            out += self._emit("response.reasoning_text.done", {**where, "content_index": 0,
                                                               "text": text})
            item["content"] = [{"type": "reasoning_text", "text": text}]
        item["status"] = "completed"
        self.items.append(item)
        return out + self._emit("response.output_item.done", {"output_index": index,
                                                              "item": item})

    def on_error(self, event: dict[str, Any], message: str) -> bytes:
        return self.start(event) + self._emit("error", {"code": "backend_error",
                                                         "param": None, "message": message})

    def _text_delta(self, key: str, item: dict[str, Any], name: str, text: str) -> bytes:
        out = self._item(key, item)
        assert self.open is not None
        self.acc += text
        return out + self._emit(name, {"item_id": self.open["id"],
                                       "output_index": len(self.items), "content_index": 0,
                                       "delta": text,
                                       **({"logprobs": []} if key == "text" else {})})

    def on_reasoning(self, text: str) -> bytes:
        return self._text_delta("reasoning", _reasoning_item(
            f"{self.rid}_{len(self.items)}", "", "in_progress"),
            "response.reasoning_text.delta", text)

    def on_text(self, text: str) -> bytes:
        return self._text_delta("text", _message_item(
            f"{self.rid}_{len(self.items)}", "", "in_progress"),
            "response.output_text.delta", text)

    def on_tool(self, key: str, call_id: Any, name: str, arguments: str) -> bytes:
        out = self._item(key, _call_item(self.rid, len(self.items), call_id, name, "",
                                         "in_progress"))
        if arguments:
            assert self.open is not None
            self.open["arguments"] += arguments
            out += self._emit("response.function_call_arguments.delta", {
                "item_id": self.open["id"], "output_index": len(self.items),
                "delta": arguments})
        return out

    def on_finish(self, choice: dict[str, Any]) -> None:
        self.finish_reason = choice["finish_reason"]

    def end(self) -> bytes:
        out = self._close()
        snap = self._snapshot("incomplete" if self.finish_reason in ("length", "content_filter")
                              else "completed")
        name = "response.incomplete" if snap["status"] == "incomplete" else "response.completed"
        return out + self._emit(name, {"response": snap})


TRANSLATOR = ResponsesTranslator()

ENDPOINTS = (Endpoint(Api.RESPONSES, "/v1/responses", dialect="responses", via=Api.CHAT,
                      translator=TRANSLATOR),)
