"""Asking each backend what it serves, off every request's path.

Every ``discovery.interval_s`` each backend with discovery on is asked for its model list (and,
where the server reports them, each model's capabilities and context: Ollama's ``/api/show``
once per model version, llama.cpp's ``/props``). What is found becomes a new ``Catalog``; the
service rebuilds its routing table from the config and the catalog when it changes, atomically,
like a config reload. A request that times out, fails or answers something of the wrong shape
changes nothing: the backend keeps what it had, is asked less often (doubling, up to
``discovery.max_backoff_s``), and the failure is logged once, with its recovery.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from ..config import Backend, backend_endpoint
from ..core.capabilities import Caps
from ..core.discovery import (
    MAX_ANSWER_BYTES,
    NOTHING,
    Catalog,
    Found,
    merge,
    model_list_path,
    read_llamacpp_props,
    read_model_list,
    read_ollama_show,
    read_ollama_tags,
)
from ..logs import log_event

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("extproc")
SHOWS_PER_POLL = 32  # Ollama model cards read per poll (the rest on the next ones)


@dataclass(slots=True)
class _Backend:
    failures: int = 0
    next_at: float = 0.0
    shows: dict[tuple[str, str], tuple[Caps | None, int | None]] = field(default_factory=dict)


class Discoverer:
    """The catalog, and each backend's polling state."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.catalog = NOTHING
        self.backends: dict[str, _Backend] = {}
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.transport = transport  # (tests: httpx.MockTransport)

    def _client(self, ca: str | None) -> httpx.AsyncClient:
        client = self.clients.get(ca or "")
        if client is None:
            client = self.clients[ca or ""] = httpx.AsyncClient(
                verify=ssl.create_default_context(cafile=ca) if ca else True, trust_env=False,
                transport=self.transport)
        return client

    async def poll(self, rt: Runtime, now: float) -> Catalog:
        """Ask every backend that is due; the catalog afterwards (the same object when
        nothing changed)."""
        cfg = rt.config
        due = [b for b in cfg.backends if b.discovers and
               self.backends.setdefault(b.name, _Backend()).next_at <= now]
        results = await asyncio.gather(*(self._ask(rt, b) for b in due),
                                       return_exceptions=True)
        catalog = self.catalog
        for b, result in zip(due, results, strict=True):
            state = self.backends[b.name]
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if state.failures == 0:  # once per outage
                    log_event(log, {"event": "discovery.failed", "backend": b.name,
                                    "why": f"{result.__class__.__name__}: {result}"[:300]},
                              logging.WARNING)
                state.failures += 1
                backoff = cfg.discovery.interval_s * 2 ** min(state.failures, 16)
                state.next_at = now + min(backoff, cfg.discovery.max_backoff_s)
                continue
            if state.failures:
                log_event(log, {"event": "discovery.recovered", "backend": b.name})
            state.failures, state.next_at = 0, now + cfg.discovery.interval_s
            catalog = merge(catalog, b.name, result)
        if catalog != self.catalog:
            self.catalog = catalog
        return self.catalog

    def wait(self, rt: Runtime, now: float) -> float:
        """How long until a backend is due (a backend the config just added: at once)."""
        due = [self.backends[b.name].next_at if b.name in self.backends else now
               for b in rt.config.backends if b.discovers]
        return min(max(min(due, default=now + rt.config.discovery.interval_s) - now, 0.05),
                   rt.config.discovery.interval_s)

    async def _get(self, client: httpx.AsyncClient, method: str, url: str,
                   headers: dict[str, str], timeout: float, json: object = None) -> bytes:
        """One answer's body, bounded in size; a non-2xx status is a failure."""
        async with client.stream(method, url, headers=headers, timeout=timeout,
                                 json=json) as resp:
            if not 200 <= resp.status_code < 300:
                raise ValueError(f"HTTP {resp.status_code} from {url}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise ValueError(f"{url} answered more than {MAX_ANSWER_BYTES} bytes")
            return bytes(body)

    async def _ask(self, rt: Runtime, b: Backend) -> list[Found]:
        cfg = rt.config
        ep = backend_endpoint(b.url)
        origin = f"{ep.scheme}://{ep.hostname or ep.host}:{ep.port}"
        client = self._client((b.tls_ca_file or cfg.envoy.ca_bundle)
                              if ep.scheme == "https" else None)
        runtime = rt.backends[b.name]
        headers = {runtime.auth_header: runtime.auth_value} \
            if runtime.auth_header and runtime.auth_value else {}
        timeout = cfg.discovery.timeout_s
        listed = await self._get(client, "GET", origin + model_list_path(
            b.preset, runtime.base_path), headers, timeout)
        if b.preset == "ollama":
            return await self._ollama(client, origin, headers, timeout, b.name,
                                      read_ollama_tags(listed))
        found = read_model_list(listed)
        if b.preset == "llamacpp" and len(found) == 1:  # /props is the one loaded model's
            try:
                caps, context = read_llamacpp_props(
                    await self._get(client, "GET", origin + "/props", headers, timeout))
            except (httpx.HTTPError, ValueError):
                return found  # the list stands without what /props would add
            f = found[0]
            found = [Found(f.name, caps or f.caps, context or f.context)]
        return found

    async def _ollama(self, client: httpx.AsyncClient, origin: str, headers: dict[str, str],
                      timeout: float, backend: str, tags: list[tuple[str, str]]
                      ) -> list[Found]:
        """Ollama's models, each with its model card (read once per version)."""
        shows = self.backends[backend].shows
        todo = [t for t in tags if t not in shows][:SHOWS_PER_POLL]

        async def show(name: str) -> tuple[Caps | None, int | None] | None:
            try:
                return read_ollama_show(await self._get(
                    client, "POST", origin + "/api/show", headers, timeout, {"model": name}))
            except (httpx.HTTPError, ValueError):
                return None  # listed all the same, capabilities unknown until read

        for key, card in zip(todo, await asyncio.gather(*(show(n) for n, _ in todo)),
                             strict=True):
            if card is not None:  # a card that failed is asked for again next poll
                shows[key] = card
        if len(shows) > 4 * len(tags) + 64:  # versions no longer pulled
            for key in [k for k in shows if k not in set(tags)]:
                del shows[key]
        return [Found(n, *shows.get((n, d), (None, None))) for n, d in tags]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
