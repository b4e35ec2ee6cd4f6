"""TEST TOOL: the emulators' answers on the APIs beyond chat: Anthropic Messages, OpenAI
Responses, audio uploads and speech, image generation, rerank and score.

Written from the APIs' own references and the servers' behaviour (vLLM, llama.cpp, Ollama
serve Messages and Responses by converting to their chat engine; Ollama takes only base64
images), independently of the gateway's translators: the tests compare the two.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
from typing import Any

import orjson

from .emulated_llamacpp import model_list as llamacpp_models
from .emulated_vllm import VERSION as VLLM_VERSION
from .emulated_vllm import model_entry

# Which APIs each flavour serves (as the servers do in December 2026).
FLAVOUR_APIS: dict[str, frozenset[str]] = {
    "vllm": frozenset({"chat", "completions", "embeddings", "responses", "messages",
                       "count_tokens", "transcriptions", "translations", "rerank", "score"}),
    "sglang": frozenset({"chat", "completions", "embeddings", "responses", "rerank", "score"}),
    "llamacpp": frozenset({"chat", "completions", "embeddings", "responses", "messages",
                           "count_tokens", "transcriptions", "rerank"}),
    "ollama": frozenset({"chat", "completions", "embeddings", "responses", "messages",
                         "transcriptions"}),
    "openai": frozenset({"chat", "completions", "embeddings", "responses", "transcriptions",
                         "translations", "speech", "images"}),
    "azure": frozenset({"chat", "completions", "embeddings", "responses", "transcriptions",
                        "translations", "speech", "images"}),
    "ocr": frozenset({"chat"}),
}

# Longest suffix first: "/chat/completions" before "/completions".
_SUFFIXES = (("/messages/count_tokens", "count_tokens"), ("/chat/completions", "chat"),
             ("/completions", "completions"), ("/embeddings", "embeddings"),
             ("/responses", "responses"), ("/messages", "messages"),
             ("/audio/transcriptions", "transcriptions"), ("/audio/translations", "translations"),
             ("/audio/speech", "speech"), ("/images/generations", "images"),
             ("/rerank", "rerank"), ("/score", "score"))

# A 1x1 PNG: what the image endpoint draws.
_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e5273fd80000000049454e44ae426082"
)).decode()


def api_of(path: str) -> str | None:
    for suffix, api in _SUFFIXES:
        if path.endswith(suffix):
            return api
    return None


def read_form(content_type: str, body: bytes) -> dict[str, Any]:
    """A multipart upload's fields, parsed with the standard library's MIME parser (text
    fields as str, files as {"filename", "bytes"})."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ValueError("not a multipart body")
    out: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        out[name] = {"filename": filename, "bytes": payload} if filename else \
            payload.decode("utf-8", "replace")
    return out


# ---------------------------------------------------------------- Anthropic Messages

def messages_answer(name: str, model: str, data: dict[str, Any], ignore_tools: bool,
                    text: str) -> tuple[list[dict[str, Any]], str]:
    """(content blocks, stop reason) a capable model answers."""
    tools = [t for t in data.get("tools") or () if isinstance(t, dict)]
    choice = data.get("tool_choice") if isinstance(data.get("tool_choice"), dict) else {}
    if tools and choice.get("type") in ("any", "tool") and not ignore_tools:
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
        return [{"type": "tool_use", "id": "toolu_emu", "name": tool.get("name"),
                 "input": _fake_object(tool.get("input_schema"))}], "tool_use"
    return [{"type": "text", "text": text}], "end_turn"


def message_object(model: str, content: list[dict[str, Any]], stop: str | None
                   ) -> dict[str, Any]:
    return {"id": "msg_emu", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 8}}


def messages_events(model: str, content: list[dict[str, Any]], stop: str) -> list[bytes]:
    def ev(kind: str, **payload: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(
            {"type": kind, **payload}) + b"\n\n"

    out = [ev("message_start", message={**message_object(model, [], None),
                                        "usage": {"input_tokens": 10, "output_tokens": 1}}),
           ev("ping")]
    for i, block in enumerate(content):
        if block["type"] == "text":
            out.append(ev("content_block_start", index=i,
                          content_block={"type": "text", "text": ""}))
            words = block["text"].split(" ")
            out += [ev("content_block_delta", index=i, delta={
                "type": "text_delta", "text": w + (" " if k < len(words) - 1 else "")})
                for k, w in enumerate(words)]
        else:
            out.append(ev("content_block_start", index=i, content_block={
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}))
            out.append(ev("content_block_delta", index=i, delta={
                "type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}))
        out.append(ev("content_block_stop", index=i))
    out.append(ev("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                  usage={"output_tokens": 8}))
    out.append(ev("message_stop"))
    return out


# ---------------------------------------------------------------- OpenAI Responses

def responses_output(model: str, data: dict[str, Any], ignore_tools: bool, text: str
                     ) -> list[dict[str, Any]]:
    tools = [t for t in data.get("tools") or () if isinstance(t, dict)
             and t.get("type") == "function"]
    choice = data.get("tool_choice")
    forced = choice == "required" or (isinstance(choice, dict) and choice.get("type") ==
                                      "function")
    if tools and forced and not ignore_tools:
        name = choice.get("name") if isinstance(choice, dict) else None
        tool = next((t for t in tools if t.get("name") == name), tools[0])
        return [{"type": "function_call", "id": "fc_emu", "call_id": "call_emu",
                 "name": tool.get("name"), "status": "completed",
                 "arguments": orjson.dumps(_fake_object(tool.get("parameters"))).decode()}]
    return [{"type": "message", "id": "msg_emu", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": text, "annotations": []}]}]


def response_object(model: str, output: list[dict[str, Any]], status: str = "completed"
                    ) -> dict[str, Any]:
    return {"id": "resp_emu", "object": "response", "created_at": 1_700_000_000,
            "status": status, "error": None, "incomplete_details": None, "instructions": None,
            "model": model, "output": output, "parallel_tool_calls": True,
            "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "usage": {"input_tokens": 10, "output_tokens": 8, "total_tokens": 18,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}


def responses_events(model: str, output: list[dict[str, Any]]) -> list[bytes]:
    seq = iter(range(10_000))

    def ev(kind: str, **payload: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(
            {"type": kind, "sequence_number": next(seq), **payload}) + b"\n\n"

    out = [ev("response.created", response=response_object(model, [], "in_progress")),
           ev("response.in_progress", response=response_object(model, [], "in_progress"))]
    for i, item in enumerate(output):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(ev("response.output_item.added", output_index=i, item={
                **item, "status": "in_progress", "content": []}))
            out.append(ev("response.content_part.added", item_id=item["id"], output_index=i,
                          content_index=0, part={"type": "output_text", "text": "",
                                                 "annotations": []}))
            words = text.split(" ")
            out += [ev("response.output_text.delta", item_id=item["id"], output_index=i,
                       content_index=0, delta=w + (" " if k < len(words) - 1 else ""))
                    for k, w in enumerate(words)]
            out.append(ev("response.output_text.done", item_id=item["id"], output_index=i,
                          content_index=0, text=text))
            out.append(ev("response.content_part.done", item_id=item["id"], output_index=i,
                          content_index=0, part=item["content"][0]))
        else:
            out.append(ev("response.output_item.added", output_index=i, item={
                **item, "status": "in_progress", "arguments": ""}))
            out.append(ev("response.function_call_arguments.delta", item_id=item["id"],
                          output_index=i, delta=item["arguments"]))
            out.append(ev("response.function_call_arguments.done", item_id=item["id"],
                          output_index=i, arguments=item["arguments"]))
        out.append(ev("response.output_item.done", output_index=i, item=item))
    out.append(ev("response.completed", response=response_object(model, output)))
    return out


# ---------------------------------------------------------------- the rest

def other_answer(api: str, name: str, model: str, data: dict[str, Any]
                 ) -> tuple[Any, str]:
    """(payload, content type) for audio, images, rerank and score."""
    if api in ("transcriptions", "translations"):
        upload = data.get("file")
        size = len(upload["bytes"]) if isinstance(upload, dict) else 0
        text = f"{name} heard {size} bytes with {model}"
        if data.get("response_format") == "text":
            return text.encode(), "text/plain"
        return {"text": text}, ""
    if api == "speech":
        return b"RIFF\x24\x00\x00\x00WAVEfmt " + str(data.get("input", "")).encode()[:64], \
            "audio/wav"
    if api == "images":
        return {"created": 1_700_000_000, "data": [{"b64_json": _PNG}]}, ""
    if api == "rerank":
        docs = data.get("documents") if isinstance(data.get("documents"), list) else []
        results = sorted(({"index": i, "relevance_score": round(1 / (i + 1), 3)}
                          for i in range(len(docs))), key=lambda r: -r["relevance_score"])
        return {"id": "rerank-emu", "model": model, "results": results,
                "usage": {"total_tokens": 10}}, ""
    return {"id": "score-emu", "object": "list", "model": model,  # score
            "data": [{"index": 0, "object": "score", "score": 0.5}]}, ""


def _fake_object(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return {k: "x" for k in props} if isinstance(props, dict) else {}


# ---------------------------------------------------------------- what a server says it serves

CATALOG_PATHS = ("/v1/models", "/models", "/api/tags", "/api/show", "/props", "/version")
# What a model can do, in Ollama's words, when a test has not said (a capable model, like the
# emulators' answers).
CAPABLE = ("completion", "tools", "vision", "audio", "thinking")


def catalog_answer(flavour: str, name: str, method: str, path: str, body: bytes,
                   models: list[str], cards: dict[str, dict[str, Any]]
                   ) -> tuple[int, Any] | None:
    """The model list and model cards in the shapes each server uses (None: not one of those
    paths, or not this server's). ``cards``: per model, Ollama-style ``capabilities`` and a
    ``context`` length."""
    def caps(m: str) -> list[str]:
        return list(cards.get(m, {}).get("capabilities", CAPABLE))

    def context(m: str) -> int:
        return int(cards.get(m, {}).get("context", 32768))

    if method == "GET" and path in ("/v1/models", "/models"):
        if flavour == "vllm":  # vLLM: max_model_len, root, parent (LoRA adapters)
            data = [model_entry(m, context(m)) for m in models]
        elif flavour == "llamacpp":  # llama.cpp: meta with the context, an Ollama-style list
            return 200, llamacpp_models(models, context(models[0]) if models else 4096)
        else:
            data = [{"id": m, "object": "model", "created": 1_700_000_000,
                     "owned_by": "library" if flavour == "ollama" else name} for m in models]
        return 200, {"object": "list", "data": data}
    if flavour == "ollama" and method == "GET" and path == "/api/tags":
        return 200, {"models": [{"name": m, "model": m, "modified_at": "2026-11-30T10:00:00Z",
                                 "size": 2_000_000_000, "digest": f"sha256:{abs(hash(m)):x}",
                                 "details": {"format": "gguf", "family": "llama"}}
                                for m in models]}
    if flavour == "ollama" and method == "POST" and path == "/api/show":
        try:
            wanted = orjson.loads(body or b"{}").get("model")
        except (orjson.JSONDecodeError, AttributeError):
            wanted = None
        if wanted not in models:
            return 404, {"error": f"model '{wanted}' not found"}
        return 200, {"modelfile": "# Modelfile", "parameters": "", "template": "{{ .Prompt }}",
                     "details": {"format": "gguf", "family": "llama"},
                     "model_info": {"general.architecture": "llama",
                                    "llama.context_length": context(wanted)},
                     "capabilities": caps(wanted)}
    if flavour == "llamacpp" and method == "GET" and path == "/props":
        first = models[0] if models else ""
        return 200, {"default_generation_settings": {"n_ctx": context(first)},
                     "total_slots": 1, "model_path": f"/models/{first}.gguf",
                     "modalities": {"vision": "vision" in caps(first),
                                    "audio": "audio" in caps(first)},
                     "chat_template_caps": {"supports_tools": "tools" in caps(first)},
                     "build_info": "b7000-emulated"}
    if flavour == "vllm" and method == "GET" and path == "/version":
        return 200, {"version": VLLM_VERSION}
    return None
