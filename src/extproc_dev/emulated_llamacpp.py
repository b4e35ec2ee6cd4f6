"""TEST TOOL: what makes the llama.cpp emulator answer as llama.cpp's server does, field for
field.

Checked against a real ``llama-server`` (built from the llama.cpp source in llama-cpp-python
0.3.36) by ``make conformance`` (conformance/table.md): its error envelope (``code`` first,
``server_error`` for a 500), 404 ``File Not Found`` for any other path or method, a body that
is not JSON as a 500 from its JSON parser, media a model cannot take as a 500 with the mmproj
hint, every other unknown part as a bare 400, and the ``timings``, ``system_fingerprint`` and
cached-token details in every answer.
"""

from __future__ import annotations

from typing import Any

import orjson

FINGERPRINT = "b1-emulated"
# Media the parser knows beyond the types we rely on (ACCEPTED_PARTS["llamacpp"]): an image URL
# given as a bare string, and video (which needs a projector that takes it).
PARSER_EXTRA = frozenset({"image_url_string", "video_url"})
# Which capability each media part needs (Ollama's words, as the emulator's cards use them).
NEEDS = {"image_url": "vision", "image_url_string": "vision", "input_audio": "audio",
         "video_url": "video"}
_MEDIA = {"vision": "image", "audio": "audio", "video": "video"}


def error(status: int, message: str) -> dict[str, Any]:
    kind = {404: "not_found_error"}.get(status, "server_error" if status >= 500
                                        else "invalid_request_error")
    return {"error": {"code": status, "message": message, "type": kind}}


NOT_FOUND = error(404, "File Not Found")


def parse_body(body: bytes) -> Any:
    """The JSON body (whatever the content type says), or ValueError carrying the 500 its JSON
    parser's exception becomes."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(error(500, f"[json.exception.parse_error.101] parse error at line 1, "
                               f"column {exc.pos + 1}: syntax error while parsing value")
                         ) from None


def check_request(data: Any) -> None:
    if not isinstance(data, dict) or "messages" not in data:
        raise ValueError(error(400, "'messages' is required"))
    if not isinstance(data["messages"], list):
        raise ValueError(error(400, "Expected 'messages' to be an array"))


def check_part(kind: str | None, part: dict[str, Any], caps: frozenset[str],
               accepted: frozenset[str]) -> None:
    """One content part (ValueError carrying the error body)."""
    if kind not in accepted and kind not in PARSER_EXTRA:
        raise ValueError(error(400, "unsupported content[].type"))
    if kind == "text" and "text" not in part:
        raise ValueError(error(500, "Failed to parse messages: [json.exception.out_of_range.403]"
                               " key 'text' not found"))
    need = NEEDS.get(str(kind))
    if need is not None and need not in caps:
        raise ValueError(error(500, f"{_MEDIA[need]} input is not supported - hint: if this is "
                               "unexpected, you may need to provide the mmproj"))


def _usage(core: dict[str, Any]) -> dict[str, Any]:
    return {**core, "prompt_tokens_details": {"cached_tokens": 0}}


def _timings(n: int) -> dict[str, Any]:
    return {"cache_n": 0, "prompt_n": 10, "prompt_ms": 1.0, "prompt_per_token_ms": 0.1,
            "prompt_per_second": 10000.0, "predicted_n": n, "predicted_ms": 1.0,
            "predicted_per_token_ms": 0.1, "predicted_per_second": 10000.0}


def answer_body(core: dict[str, Any]) -> dict[str, Any]:
    """A chat or text completion with the fields llama.cpp adds."""
    choices = [{**c, "logprobs": None} if "text" in c else c for c in core["choices"]]
    return {**core, "choices": choices, "system_fingerprint": FINGERPRINT,
            "usage": _usage(core.get("usage") or {"prompt_tokens": 10, "completion_tokens": 8,
                                                  "total_tokens": 18}),
            "timings": _timings(core.get("usage", {}).get("completion_tokens", 8))}


def chunks(chunks_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chat stream's chunks as llama.cpp writes them: the role delta with a null content, the
    fingerprint on every chunk, timings on the last (the usage chunk when there is one)."""
    out = [{**c, "system_fingerprint": FINGERPRINT} for c in chunks_]
    if out and out[0]["choices"]:
        out[0]["choices"] = [{**out[0]["choices"][0], "delta": {"role": "assistant",
                                                                "content": None}}]
    last = out[-1]
    if "usage" in last:
        last["usage"] = _usage(last["usage"])
    last["timings"] = _timings(len(out))
    return out


def model_list(models: list[str], context: int) -> dict[str, Any]:
    return {
        "models": [{"name": m, "model": m, "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""],
                    "capabilities": ["completion"], "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "",
                                "families": [""], "parameter_size": "",
                                "quantization_level": ""}} for m in models],
        "object": "list",
        "data": [{"id": m, "aliases": [m], "tags": [], "object": "model",
                  "created": 1_700_000_000, "owned_by": "llamacpp",
                  "meta": {"vocab_type": 2, "n_vocab": 32000, "n_ctx": context,
                           "n_ctx_train": context, "n_embd": 4096,
                           "n_params": 7_000_000_000, "size": 4_000_000_000,
                           "ftype": "Q4_K - Medium"}} for m in models]}
