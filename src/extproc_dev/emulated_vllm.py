"""TEST TOOL: what makes the vLLM emulator answer as vLLM 0.32 does, field for field.

Checked against a real vLLM CPU server by ``make conformance`` (conformance/table.md):
the extra fields vLLM puts in every answer, its FastAPI validation errors ("Bad Request", the
field in ``param``), its part-type and text-only-model refusals, and what its request model
refuses: a message's first part is validated strictly (``input_text`` or a part without
``type`` there is a 400, although the parser takes them as later parts), an ``image_url`` given
as a string and an ``input_image`` without ``detail`` anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

VERSION = "0.32.0"
FINGERPRINT = f"vllm-{VERSION}-emulated"

# The part types vLLM's chat parser names when it refuses one.
PARSER_TYPES = ("audio_embeds, audio_url, image_embeds, image_pil, image_url, input_audio, "
                "input_image, input_text, output_text, prompt_embeds, refusal, text, thinking, "
                "tool_reference, video_embeds, video_url")
# Types a text-only model refuses ("<model> is not a multimodal model").
MULTIMODAL = frozenset({"image_url", "input_image", "input_audio", "audio_url", "video_url",
                        "untyped_image_url"})
# The request model validates a message's *first* part strictly (pydantic, against the OpenAI
# part types and a few of vLLM's); later parts go to the lenient parser unvalidated. Beyond the
# types it takes anywhere (the emulator's ACCEPTED_PARTS["vllm"]), these pass as a first part:
FIRST_PART_EXTRA = frozenset({"input_image", "refusal", "thinking", "file", "image_embeds",
                              "audio_embeds", "video_embeds", "image_pil", "prompt_embeds",
                              "output_text", "tool_reference"})
# and these get past the parser (its own names, and a part without a type as an image):
PARSER_EXTRA = frozenset({"input_text", "untyped_image_url", "input_image", "refusal",
                         "thinking", "output_text", "tool_reference", "image_embeds",
                         "audio_embeds", "video_embeds", "image_pil", "prompt_embeds"})
# Refused wherever they are, with the first line of the message:
ALWAYS_REFUSED = {
    "image_url_string": "1 validation error for ChatCompletionContentPartImageParam",
    "input_image_no_detail": "1 validation error for ResponseInputImageParam",
}


def error(status: int, message: str, param: str | None = None,
          kind: str | None = None) -> dict[str, Any]:
    kind = kind or {400: "BadRequestError", 404: "NotFoundError"}.get(status,
                                                                     "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"'<dict of {len(value)} items>'"
    return repr(value)


def validation_error(loc: str, kind: str, msg: str, value: Any,
                     ctx: dict[str, str] | None = None) -> dict[str, Any]:
    """FastAPI's request validation error as vLLM wraps it (type "Bad Request")."""
    detail = f"{{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': {_describe(value)}"
    if ctx:
        detail += ", 'ctx': " + repr(ctx)
    return error(400, f"1 validation error:\n  {detail}}}", loc, kind="Bad Request")


def parse_body(body: bytes, content_type: str) -> Any:
    """The JSON body, or ValueError carrying vLLM's error for it."""
    if content_type.split(";")[0].strip() not in ("application/json", ""):
        raise ValueError(error(400, "1 validation error:\n  Unsupported Media Type: Only "
                               "'application/json' is allowed", kind="Bad Request"))
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(validation_error(f"body.{exc.pos}", "json_invalid", "JSON decode error",
                                          {}, {"error": exc.msg})) from None
    except UnicodeDecodeError:
        raise ValueError(validation_error("body", "json_invalid", "JSON decode error", {})
                         ) from None


def check_request(data: Any, models: list[str], context_of: Callable[[str], int]) -> str:
    """The request-level checks, in vLLM's order; the model served. Raises ValueError
    carrying the error body."""
    if not isinstance(data, dict):
        raise ValueError(validation_error("body", "dict_type", "Input should be a valid "
                                          "dictionary", data))
    messages = data.get("messages", ...)
    if messages is ...:
        raise ValueError(validation_error("body.messages", "missing", "Field required", data))
    if not isinstance(messages, list):
        raise ValueError(validation_error("body.messages", "list_type",
                                          "Input should be a valid list", messages))
    model = data.get("model")
    if model is None and models:
        model = models[0]  # vLLM serves its model when the request names none
    if model not in models:
        raise ValueError(error(404, f"The model `{model}` does not exist. Valid aliases: "
                               f"{', '.join(models)}.", "model"))
    out, context = data.get("max_completion_tokens") or data.get("max_tokens"), \
        context_of(str(model))
    if isinstance(out, int) and out > context:
        raise ValueError(error(400, f"max_tokens={out} cannot be greater than max_model_len="
                               f"{context}. Please request fewer output tokens. "
                               f"(parameter=max_tokens, value={out})", "max_tokens"))
    return str(model)


def check_part(kind: str | None, part: dict[str, Any], model: str, text_only: bool,
               first: bool, anywhere: frozenset[str]) -> None:
    """One content part as vLLM takes it (``anywhere``: the types it takes in any position):
    refused by the request model (a first part, or a malformed image), by the parser (a type
    it does not know), or by a text-only model (ValueError carrying the error body)."""
    if kind == "input_image" and "detail" not in part:
        kind = "input_image_no_detail"
    if kind == "text" and not isinstance(part.get("text"), str):
        kind = "text_without_text"
    if kind in ALWAYS_REFUSED:
        raise ValueError(error(400, ALWAYS_REFUSED[kind]))
    if kind not in anywhere:
        if first and kind not in FIRST_PART_EXTRA:
            failed = 7 if kind in ("input_text", "untyped_image_url", "text_without_text") \
                else 8
            raise ValueError(error(400, f"{failed} validation errors for ValidatorIterator"))
        if kind not in PARSER_EXTRA:
            raise ValueError(error(400, f"Unsupported chat content part type: '{kind}'. "
                                   f"Supported types: {PARSER_TYPES}. (parameter=type, "
                                   f"value={kind})", "type"))
    if text_only and kind in MULTIMODAL:
        raise ValueError(error(400, f"{model} is not a multimodal model"))


def chat_body(core: dict[str, Any]) -> dict[str, Any]:
    """A chat completion with the fields vLLM adds."""
    choices = [{**c, "message": {**{k: v for k, v in c["message"].items()
                                    if k != "tool_calls" or v},
                                 "refusal": None, "annotations": None, "audio": None,
                                 "function_call": None, "reasoning": None},
                "logprobs": None, "stop_reason": None, "token_ids": None,
                "routed_experts": None} for c in core["choices"]]
    return {**core, "choices": choices, "service_tier": None, "system_fingerprint": FINGERPRINT,
            "usage": {**core["usage"], "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def completion_body(core: dict[str, Any]) -> dict[str, Any]:
    """A legacy completion with the fields vLLM adds."""
    choices = [{**c, "logprobs": None, "stop_reason": None, "token_ids": None,
                "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
               for c in core["choices"]]
    return {**core, "choices": choices, "service_tier": None, "system_fingerprint": FINGERPRINT,
            "usage": {**core["usage"], "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def chunks(chunks_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chat stream's chunks with vLLM's fields: the first (the role) carries the prompt
    fields, the others ``token_ids``, the last (the finish) ``stop_reason`` and the
    fingerprint; a usage chunk the fingerprint."""
    out = []
    for i, c in enumerate(chunks_):
        if not c["choices"]:  # usage
            out.append({**c, "system_fingerprint": FINGERPRINT})
            continue
        choice = {**c["choices"][0], "logprobs": None}
        if i == 0:
            out.append({**c, "choices": [choice], "prompt_token_ids": None,
                        "prompt_text": None})
            continue
        choice["token_ids"] = None
        if choice.get("finish_reason") is not None:
            choice["stop_reason"] = None
            out.append({**c, "choices": [choice], "system_fingerprint": FINGERPRINT})
        else:
            out.append({**c, "choices": [choice]})
    return out


def model_entry(name: str, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "vllm",
            "root": f"/models/{name}", "parent": None, "max_model_len": context,
            "permission": [{"id": "modelperm-emulated", "object": "model_permission",
                            "created": 1_700_000_000, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}
