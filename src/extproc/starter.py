"""``extproc init``: a starter config written from live backends.

Each URL is asked which server it is (``discovery.server_kind``) and what it serves (the same
discovery the service runs), and the answers become a commented config: one backend per URL
with its models, and, as comments, the capabilities and context each reported (the service
keeps asking at run time; a declared list would also claim every capability it leaves out).
``extproc check`` accepts it; discovery stays on, so models loaded later are picked up.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from urllib.parse import urlsplit

import httpx
import orjson

from .config import Backend, Config
from .core.discovery import KIND_PROBES, Found, server_kind
from .effects.discovery import Discoverer
from .runtime import Runtime


def _q(text: str) -> str:
    return orjson.dumps(text).decode()  # a JSON string is a YAML string


async def _kind(client: httpx.AsyncClient, origin: str) -> tuple[str, str]:
    async def ask(path: str) -> tuple[str, tuple[int, bytes]]:
        try:
            r = await client.get(origin + path)
            return path, (r.status_code, r.content[:65536])
        except httpx.HTTPError:
            return path, (0, b"")

    return server_kind(dict(await asyncio.gather(*(ask(p) for p in KIND_PROBES))))


async def starter_config(urls: list[str], timeout: float = 5.0) -> str:
    """The config text."""
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
        entries = []
        for url in urls:
            parts = urlsplit(url.rstrip("/"))
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SystemExit(f"{url}: not an http(s) URL")
            origin = f"{parts.scheme}://{parts.netloc}"
            preset, evidence = await _kind(client, origin)
            base = parts.path or "/v1"
            entries.append((origin + base, preset, evidence, parts.port or 80))
    backends = [Backend(name=f"{preset}-{port}", preset=preset, url=base_url,
                        discovery={"enabled": True})  # type: ignore[arg-type]
                for base_url, preset, _, port in entries]
    names = [b.name for b in backends]
    for i, name in enumerate(names):  # two backends of one kind on one port number
        if names.count(name) > 1:
            backends[i] = backends[i].model_copy(update={"name": f"{name}-{i + 1}"})
    rt = Runtime.build(Config(backends=backends))
    discoverer = Discoverer()
    try:
        catalog = await discoverer.poll(rt, time.monotonic())
    finally:
        await discoverer.close()
    lines = [f"# Written by `extproc init` on {datetime.date.today()} from the backends as they "
             "answered;", "# check it with `extproc check`. Discovery stays on for local "
             "servers: models they load later", "# are picked up without editing this file.",
             "service: {host: 127.0.0.1, port: 50051}",
             "envoy: {listen_port: 10000, admin_port: 9901}", "", "backends:"]
    first = None
    for b, (_, _, evidence, _) in zip(backends, entries, strict=True):
        found: tuple[Found, ...] | None = catalog.listed.get(b.name)
        lines += [f"  - name: {b.name}", f"    preset: {b.preset}  # {evidence}",
                  f"    url: {b.url}"]
        if b.preset in ("openai", "azure"):
            lines.append("    discovery: {enabled: true}  # off by default for cloud APIs")
        if found is None:
            lines.append("    # its model list could not be read: list its models here")
            lines.append("    models: []")
            continue
        lines.append("    models:" if found else "    models: []  # it lists none yet")
        for f in found:
            first = first or f.name
            lines.append(f"      - name: {_q(f.name)}")
            reported = []
            if f.caps is not None and f.caps.known is not None:
                reported = [f"{c} {'yes' if c in f.caps.present else 'no'}"
                            for c in sorted(f.caps.known)]
            if f.context:
                reported.append(f"context {f.context}")
            lines.append(f"        # reported: {', '.join(reported)} (the service keeps asking;"
                         " declare capabilities to override)" if reported else
                         "        # capabilities: not reported; declare them, e.g. "
                         "capabilities: [tools, json]")
    if first is not None:
        lines += ["", f"default_model: {_q(first)}"]
    return "\n".join(lines) + "\n"
