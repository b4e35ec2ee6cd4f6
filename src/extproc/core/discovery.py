"""What backends say about themselves: the models they list, what each can do, its context.

Pure: where to ask (``model_list_path``) and how to read the answers (``read_*``), in each
server's own shapes, and which of the listed models become public under which names
(``exposed``). ``effects/discovery.py`` does the asking; the routing table is rebuilt from the
config plus a ``Catalog`` of what was found. Every reader is defensive: an answer of the wrong
shape raises ``ValueError`` (the poll counts as failed and changes nothing).

Shapes (read from the servers' code and docs):
- OpenAI-style ``GET {base}/models``: ``{"data": [{"id", ...}]}``. vLLM adds ``max_model_len``
  (and lists LoRA adapters with ``parent``); llama.cpp adds ``meta.n_ctx_train``;
  OpenRouter-style lists add ``context_length``, ``supported_parameters`` (tools,
  response_format, reasoning...) and ``architecture.input_modalities`` (text, image, audio).
- Ollama ``GET /api/tags``: ``{"models": [{"name", "digest", ...}]}``; ``POST /api/show``
  ``{"model": name}``: ``{"capabilities": ["completion", "vision", "tools", "thinking"...],
  "model_info": {"<arch>.context_length": n, ...}}``.
- llama.cpp ``GET /props``: ``{"modalities": {"vision": bool, "audio": bool},
  "default_generation_settings": {"n_ctx": n}, "chat_template_caps": {"supports_tools"...}}``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .capabilities import Caps

MAX_MODELS = 1000          # models read from one backend's list
MAX_ANSWER_BYTES = 4 << 20  # a model list or model card larger than this is garbage


@dataclass(frozen=True, slots=True)
class Found:
    """One model a backend lists: its name, what it reported it can do, its context."""

    name: str
    caps: Caps | None = None
    context: int | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    """What discovery knows. ``listed``: per backend polled with success, what it lists now
    (a backend absent here is not known: its config alone counts); ``gone``: (backend, model)
    pairs a backend listed before and no longer does (no longer routed there)."""

    listed: Mapping[str, tuple[Found, ...]] = field(default_factory=dict)
    gone: frozenset[tuple[str, str]] = frozenset()


NOTHING = Catalog()

# ---------------------------------------------------------------- what to ask


def model_list_path(preset: str, base_path: str) -> str:
    """Where a backend lists its models (host-relative)."""
    return "/api/tags" if preset == "ollama" else f"{base_path}/models"


# ---------------------------------------------------------------- reading the answers


def _json(raw: bytes) -> Any:
    if len(raw) > MAX_ANSWER_BYTES:
        raise ValueError(f"answer of {len(raw)} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def read_model_list(raw: bytes) -> list[Found]:
    """An OpenAI-style ``/models`` answer (vLLM, SGLang, llama.cpp, OpenAI, OpenRouter)."""
    data = _json(raw)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no data list")
    out = []
    for e in entries[:MAX_MODELS]:
        if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not e["id"]:
            continue
        meta = e.get("meta") if isinstance(e.get("meta"), dict) else {}
        context = _int(e.get("max_model_len")) or _int(e.get("context_length")) or \
            _int(meta.get("n_ctx_train"))
        out.append(Found(e["id"][:256], _openrouter_caps(e), context))
    return out


def _openrouter_caps(entry: dict[str, Any]) -> Caps | None:
    params = entry.get("supported_parameters")
    arch = entry.get("architecture") if isinstance(entry.get("architecture"), dict) else {}
    modalities = arch.get("input_modalities")
    present: set[str] = set()
    known: set[str] = set()
    if isinstance(params, list):
        known |= {"tools", "json", "reasoning"}
        present |= {"tools"} & set(params)
        if {"response_format", "structured_outputs"} & set(params):
            present.add("json")
        if {"reasoning", "include_reasoning"} & set(params):
            present.add("reasoning")
    if isinstance(modalities, list):
        known |= {"vision", "audio"}
        present |= {c for m, c in (("image", "vision"), ("audio", "audio")) if m in modalities}
    return Caps(frozenset(present), frozenset(known), True) if known else None


def read_ollama_tags(raw: bytes) -> list[tuple[str, str]]:
    """Ollama's ``/api/tags``: (name, digest) of each model pulled."""
    data = _json(raw)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError("no models list")
    return [(m["name"][:256], str(m.get("digest") or "")) for m in models[:MAX_MODELS]
            if isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"]]


# Ollama's capability names, ours.
_OLLAMA = {"vision": "vision", "tools": "tools", "thinking": "reasoning", "audio": "audio"}


def read_ollama_show(raw: bytes) -> tuple[Caps | None, int | None]:
    """Ollama's ``/api/show``: the capabilities it reports (which say every one of ours it
    knows of: vision, tools, thinking, audio) and the model's context length."""
    data = _json(raw)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    caps = data.get("capabilities")
    found = None
    if isinstance(caps, list):
        found = Caps(frozenset(ours for theirs, ours in _OLLAMA.items() if theirs in caps),
                     frozenset(_OLLAMA.values()), True)
    info = data.get("model_info") if isinstance(data.get("model_info"), dict) else {}
    context = next((_int(v) for k, v in info.items()
                    if isinstance(k, str) and k.endswith(".context_length")), None)
    return found, context


def read_llamacpp_props(raw: bytes) -> tuple[Caps | None, int | None]:
    """llama.cpp's ``/props``: the loaded model's modalities (and tool support, where the chat
    template says), and the context each slot has."""
    data = _json(raw)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    modalities = data.get("modalities")
    template = data.get("chat_template_caps")
    present: set[str] = set()
    known: set[str] = set()
    if isinstance(modalities, dict):
        for theirs, ours in (("vision", "vision"), ("audio", "audio")):
            if isinstance(modalities.get(theirs), bool):
                known.add(ours)
                if modalities[theirs]:
                    present.add(ours)
    if isinstance(template, dict) and isinstance(template.get("supports_tools"), bool):
        known.add("tools")
        if template["supports_tools"]:
            present.add("tools")
    settings = data.get("default_generation_settings")
    context = _int(settings.get("n_ctx")) if isinstance(settings, dict) else None
    return (Caps(frozenset(present), frozenset(known), True) if known else None,
            context or _int(data.get("n_ctx")))


# ---------------------------------------------------------------- what becomes public


def exposed(name: str, include: list[str], exclude: list[str], prefix: str) -> str | None:
    """The public name a listed model gets (None: not exposed): include/exclude are globs on
    the backend's name; ``prefix`` is put before it."""
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return None
    if any(fnmatch.fnmatchcase(name, g) for g in exclude):
        return None
    return prefix + name


def merge(previous: Catalog, backend: str, found: list[Found]) -> Catalog:
    """The catalog with ``backend``'s new list: what it listed before and lists no more is
    gone (until it is listed again)."""
    now = {f.name for f in found}
    before = {f.name for f in previous.listed.get(backend, ())}
    gone = {g for g in previous.gone if g[0] != backend or g[1] not in now} | \
        {(backend, n) for n in before - now}
    return Catalog({**previous.listed, backend: tuple(found)}, frozenset(gone))


# ---------------------------------------------------------------- which server is it

# Asked in order by `extproc init`: (host-relative path, what answers it).
KIND_PROBES = ("/api/version", "/props", "/get_model_info", "/version")


def server_kind(answers: Mapping[str, tuple[int, bytes]]) -> tuple[str, str]:
    """(preset, evidence) from what a server answered on ``KIND_PROBES``: Ollama answers
    ``/api/version``, llama.cpp ``/props`` (with its generation settings), SGLang
    ``/get_model_info``, vLLM ``/version``; anything else that lists models is taken as
    OpenAI-compatible."""
    def obj(path: str) -> dict[str, Any] | None:
        status, raw = answers.get(path, (0, b""))
        if status != 200:
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    if (o := obj("/api/version")) and "version" in o:
        return "ollama", f"GET /api/version: Ollama {o['version']}"
    if (o := obj("/props")) and ("default_generation_settings" in o or "build_info" in o):
        return "llamacpp", "GET /props: llama.cpp's server"
    if (o := obj("/get_model_info")) and "model_path" in o:
        return "sglang", "GET /get_model_info: SGLang"
    if (o := obj("/version")) and "version" in o:
        return "vllm", f"GET /version: vLLM {o['version']}"
    return "openai", "none of Ollama's, llama.cpp's, SGLang's or vLLM's own paths answered"
