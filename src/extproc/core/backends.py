"""Attempt stage core: adapt one upstream attempt to the backend it reached.

Envoy walks the per-request endpoint list one entry per attempt; a connect failure never reaches
us but still advances the attempt count, so the candidate is found by attempt count AND address.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import quote

import orjson

from ..config import Config, backend_endpoint
from .endpoints import BY_PATH, Api, Endpoint
from .form import parse_form, set_text
from .routing import Target

# A JSON key "model" with a string value. Quotes inside JSON strings are escaped, so an
# unescaped `"model"` followed by a colon is always a key (possibly nested; see rewrite_model).
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')

# Headers the client must never pass through to a backend on its own.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
INTERNAL_HEADERS = ("x-extproc-cluster", "x-envoy-max-retries")


@dataclass(frozen=True, slots=True)
class BackendRuntime:
    """What the attempt stage needs about a backend, resolved once at config load."""

    name: str
    auth_header: str | None
    auth_value: str | None
    forward_client_auth: bool
    base_path: str
    preset: str = "openai"
    api_version: str = ""      # azure: every request's api-version


class MissingCredential(Exception):
    pass


def backend_runtimes(cfg: Config, env: dict[str, str] | None = None) -> dict[str, BackendRuntime]:
    """Resolve credentials from the environment; a named but unset variable is an error."""
    env = dict(os.environ) if env is None else env
    out: dict[str, BackendRuntime] = {}
    for b in cfg.backends:
        value = None
        if b.api_key_env:
            key = env.get(b.api_key_env, "")
            if not key:
                raise MissingCredential(
                    f"backend {b.name!r}: environment variable {b.api_key_env} is not set"
                )
            value = f"{b.auth_scheme} {key}" if b.auth_scheme else key
        base = backend_endpoint(b.url).base_path or ("/openai" if b.preset == "azure" else "/v1")
        out[b.name] = BackendRuntime(
            b.name, b.auth_header.lower() if value else None, value, b.forward_client_auth, base,
            b.preset, b.api_version)
    return out


@dataclass(slots=True)
class HeaderPlan:
    set: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


def pick_candidate(
    cands: tuple[Target, ...], attempt: int, address: str
) -> tuple[int, Target] | None:
    """Which candidate this attempt reached: the attempt-th entry if its address matches, else
    the next entry with that address (skipped entries shift numbering), else any with it."""
    i = attempt - 1
    if 0 <= i < len(cands) and cands[i].address == address:
        return i, cands[i]
    order = list(range(max(i, 0), len(cands))) + list(range(min(max(i, 0), len(cands))))
    for j in order:
        if cands[j].address == address:
            return j, cands[j]
    return None


def credential_headers(backends: dict[str, BackendRuntime]) -> tuple[str, ...]:
    """Every header that carries a credential: the client's kinds and each backend's own."""
    return tuple(dict.fromkeys([*CLIENT_CREDENTIAL_HEADERS, *(
        b.auth_header for b in backends.values() if b.auth_header)]))


def client_credentials(headers: dict[str, str]) -> dict[str, str]:
    return {h: headers[h] for h in CLIENT_CREDENTIAL_HEADERS if headers.get(h)}


def target_path(backend: BackendRuntime, endpoint: Endpoint, translated: bool, client_path: str,
                model: str) -> str:
    """The path one backend is asked on: its base path and the endpoint's (or, translated, the
    API it is spoken to in, without the client's query); Azure's deployment form with its
    api-version. A path the gateway does not know keeps the client's, under the base path."""
    path, _, query = client_path.partition("?")
    if endpoint.api is Api.OTHER:
        if backend.base_path != "/v1" and path.startswith("/v1"):
            return backend.base_path + client_path[3:]
        return client_path
    suffix = BY_PATH["/v1/chat/completions"].suffix if translated else endpoint.suffix
    if backend.preset == "azure":
        where = "" if endpoint.api is Api.RESPONSES and not translated else \
            f"/deployments/{quote(model, safe='')}"
        return f"{backend.base_path}{where}{suffix}?api-version={quote(backend.api_version)}"
    return backend.base_path + suffix + (f"?{query}" if query and not translated else "")


def header_plan(backend: BackendRuntime, path: str, credentials: tuple[str, ...],
                client_auth: dict[str, str], current_path: str | None = None) -> HeaderPlan:
    """Credentials and path for one backend, set from scratch: Envoy hands a retry the headers
    the previous attempt's upstream filter left, so every credential header any backend uses
    is removed and only this backend's (or, where it forwards them, the client's own, carried
    from the route stage) is set; ``path`` (``target_path``) replaces ``current_path``."""
    plan = HeaderPlan(remove=list(INTERNAL_HEADERS))
    if backend.auth_value is not None:
        assert backend.auth_header is not None
        plan.set.append((backend.auth_header, backend.auth_value))
    elif backend.forward_client_auth:
        plan.set += client_auth.items()
    named = {h for h, _ in plan.set}
    plan.remove += [h for h in credentials if h not in named]
    if path != current_path:
        plan.set.append((":path", path))
    return plan


def set_model(body: bytes, body_model: str | None, model: str, content_type: str) -> bytes | None:
    """The body naming ``model`` (None when it already does): a JSON body's top-level key, a
    multipart upload's ``model`` field (the rest byte for byte)."""
    if content_type.lower().startswith("multipart/form-data"):
        form = parse_form(body, content_type)
        if form.text(body, "model") == model:
            return None
        return set_text(body, form, "model", model)
    return rewrite_model(body, body_model, model)


def rewrite_model(body: bytes, body_model: str | None, new_model: str) -> bytes | None:
    """Set the top-level ``model`` to ``new_model``; None when the body already says so.

    Splices the bytes when the key occurs once with the expected value (no re-serialisation of
    a multi-MB body); falls back to parse + dump when it is ambiguous (nested "model" keys).
    """
    if body_model == new_model:
        return None
    new_value = orjson.dumps(new_model)
    if body_model is None:
        start = body.find(b"{")
        if start >= 0 and not _MODEL_KEY.search(body):
            rest = body[start + 1:]
            sep = b"" if rest.lstrip().startswith(b"}") else b","
            return body[: start + 1] + b'"model":' + new_value + sep + rest
    else:
        matches = list(_MODEL_KEY.finditer(body))
        if len(matches) == 1:
            m = matches[0]
            try:
                found = orjson.loads(b'"' + m.group(1) + b'"')
            except orjson.JSONDecodeError:
                found = None
            if found == body_model:
                return body[: m.start(1) - 1] + new_value + body[m.end(1) + 1:]
    data = orjson.loads(body)
    data["model"] = new_model
    return orjson.dumps(data)


def common_backend(cands: tuple[Target, ...], backends: dict[str, BackendRuntime]
                   ) -> BackendRuntime | None:
    """The one attempt plan every candidate would get (same served model name, credentials and
    path), or None when any two differ and the attempt stage must adapt each attempt."""
    first = backends[cands[0].backend]
    key = (cands[0].model, first.auth_header, first.auth_value, first.forward_client_auth,
           first.base_path, first.api_version if first.preset == "azure" else None)
    for t in cands[1:]:
        b = backends[t.backend]
        if (t.model, b.auth_header, b.auth_value, b.forward_client_auth, b.base_path,
                b.api_version if b.preset == "azure" else None) != key:
            return None
    return first
