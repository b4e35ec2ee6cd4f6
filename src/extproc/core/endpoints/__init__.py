"""Every endpoint clients call, one module each, and which APIs each server speaks.

``PRESET_APIS`` is data read from each server's own routes and documentation (December 2026;
``backends[].apis`` overrides it per backend): vLLM serves Responses, Messages (and token
counting), transcription, translation, rerank and score besides chat; llama.cpp's server
Responses, Messages, transcription (with an audio projector) and rerank; Ollama Responses,
Messages and transcription; SGLang Responses, rerank and score; OpenAI (and Azure OpenAI)
Responses, audio and images, but not Messages or rerank.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import orjson

from ..errors import Reply
from . import audio, chat, completions, images, messages, rerank, responses
from .base import Api, ChatView, Dialect, Endpoint, Origin, StreamTranslator, Translator

ENDPOINTS: tuple[Endpoint, ...] = (*chat.ENDPOINTS, *completions.ENDPOINTS, *responses.ENDPOINTS,
                                   *messages.ENDPOINTS, *audio.ENDPOINTS, *images.ENDPOINTS,
                                   *rerank.ENDPOINTS)
BY_PATH = {e.path: e for e in ENDPOINTS}
BY_SUFFIX = {e.suffix: e for e in ENDPOINTS}
OTHER = Endpoint(Api.OTHER, "")

_OPENAI = frozenset({Api.CHAT, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RESPONSES,
                     Api.TRANSCRIPTIONS, Api.TRANSLATIONS, Api.SPEECH, Api.IMAGES})
PRESET_APIS: dict[str, frozenset[Api]] = {
    "vllm": frozenset({Api.CHAT, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RESPONSES, Api.MESSAGES,
                       Api.COUNT_TOKENS, Api.TRANSCRIPTIONS, Api.TRANSLATIONS, Api.RERANK,
                       Api.SCORE}),
    "sglang": frozenset({Api.CHAT, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RESPONSES, Api.RERANK,
                         Api.SCORE}),
    "llamacpp": frozenset({Api.CHAT, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RESPONSES,
                           Api.MESSAGES, Api.COUNT_TOKENS, Api.TRANSCRIPTIONS, Api.RERANK}),
    "ollama": frozenset({Api.CHAT, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RESPONSES, Api.MESSAGES,
                         Api.TRANSCRIPTIONS}),
    "openai": _OPENAI,
    "azure": _OPENAI,
}

# Azure OpenAI's client paths: the deployment (our model name) is in the path.
_AZURE = re.compile(r"^/openai/deployments/([^/]{1,256})(/.+)$")


def endpoint_for(path: str, extra: frozenset[str] = frozenset()) -> tuple[Endpoint, str | None]:
    """The endpoint a client path (no query) names, and the model an Azure-style path carries;
    ``extra``: paths the config routes as they are (``Api.OTHER``). Raises KeyError."""
    found = BY_PATH.get(path)
    if found is not None:
        return found, None
    m = _AZURE.match(path)
    if m is not None and m.group(2) in BY_SUFFIX:
        return BY_SUFFIX[m.group(2)], unquote(m.group(1))
    if path in extra:
        return OTHER, None
    raise KeyError(path)


def in_envelope(endpoint: Endpoint, reply: Reply) -> Reply:
    """A gateway error in the shape the endpoint's clients parse: Anthropic's for Messages
    (the field named and the code kept beside the message)."""
    if endpoint.envelope != "anthropic" or reply.status < 400:
        return reply
    try:
        err = orjson.loads(reply.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return reply
    if not isinstance(err, dict):
        return reply
    extra = {k: v for k, v in err.items() if k not in ("message", "type") and v is not None}
    body = messages.error_envelope(reply.status, str(err.get("message", "")), extra)
    return Reply(reply.status, body, reply.headers, reply.code)


__all__ = ["BY_PATH", "ENDPOINTS", "OTHER", "PRESET_APIS", "Api", "ChatView", "Dialect",
           "Endpoint", "Origin", "StreamTranslator", "Translator", "endpoint_for", "in_envelope",
           "translated_whole"]


def translated_whole(translator: Translator, status: int, body: bytes,
                     echo: dict[str, Any]) -> bytes:
    """A whole answer in the client's API: a completion translated, an error in its envelope;
    what cannot be read passes as it came."""
    if status >= 400:
        return translator.error(status, body)
    try:
        chat = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return orjson.dumps(translator.answer(chat, echo)) if isinstance(chat, dict) else body
