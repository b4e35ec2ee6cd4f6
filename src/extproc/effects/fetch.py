"""Remote media fetches for backends that cannot fetch themselves, guarded against SSRF.

The host is resolved once; every address must be public (no loopback, private, link-local,
metadata, multicast or reserved range) unless the operator allows it; the connection then goes
to the checked address itself (Host header and TLS SNI keep the name), so a second DNS answer
cannot rebind it. Redirects are followed by hand, each hop checked the same way. Size, time and
content type are limited.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

from ..core.errors import Refusal, refusal
from .sharing import FairLimiter


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    allow_private: bool = False
    allow_hosts: frozenset[str] = frozenset()
    allow_http: bool = False
    max_redirects: int = 3
    ca_bundle: str | None = None
    concurrency: int = 8


def _refuse(param: str, why: str, status: int = 400, code: str = "url_refused") -> Refusal:
    return refusal(status, f"{param}: {why}", code=code, param=param)


@dataclass(slots=True)
class FetchBudget:
    """What one request may fetch in all (``fetch.max_bytes_per_request``)."""

    left: int

    def take(self, n: int, param: str) -> None:
        self.left -= n
        if self.left < 0:
            raise _refuse(param, "the media fetched for this request is over the "
                          "fetch.max_bytes_per_request limit", 413, "fetch_budget_exceeded")


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_v4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: mapped, 6to4, Teredo, NAT64, IPv4-compatible.
    ``64:ff9b::7f00:1`` is loopback behind a NAT64 gateway, yet a global IPv6 address."""
    out = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if addr.teredo:
        out += list(addr.teredo)
    if any(addr in net for net in _NAT64) or addr in _V4_COMPATIBLE:
        out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr.is_global and not addr.is_multicast


def address_allowed(ip: str, policy: FetchPolicy, host: str) -> bool:
    if policy.allow_private or host in policy.allow_hosts:
        return True
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner:  # what it leads to decides (::ffff:8.8.8.8 is fine, 64:ff9b::7f00:1 not)
            return all(_public(a) for a in inner)
    return _public(addr)


async def resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Fetcher:
    """Fetch URLs under a policy, with a small TTL cache shared by retries and requests;
    ``policy.concurrency`` fetches at once, taken in turn by the requests waiting."""

    def __init__(self, policy: FetchPolicy, cache_bytes: int = 64 * 1024 * 1024,
                 ttl_s: float = 300.0):
        self.policy = policy
        self.slots = FairLimiter(policy.concurrency)
        self.cache: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self.cache_bytes, self.ttl_s, self._size = cache_bytes, ttl_s, 0
        ctx = ssl.create_default_context(cafile=policy.ca_bundle) if policy.ca_bundle else \
            ssl.create_default_context()
        self.client = httpx.AsyncClient(verify=ctx, follow_redirects=False, trust_env=False,
                                        timeout=policy.timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _cached(self, url: str) -> tuple[str, bytes] | None:
        hit = self.cache.get(url)
        if hit is None or hit[0] < time.monotonic():
            return None
        self.cache.move_to_end(url)
        return hit[1], hit[2]

    def _store(self, url: str, mime: str, data: bytes) -> None:
        if len(data) > self.cache_bytes // 4:
            return
        old = self.cache.pop(url, None)
        if old:
            self._size -= len(old[2])
        self.cache[url] = (time.monotonic() + self.ttl_s, mime, data)
        self._size += len(data)
        while self._size > self.cache_bytes and self.cache:
            _, (_, _, d) = self.cache.popitem(last=False)
            self._size -= len(d)

    async def fetch(self, url: str, param: str, owner: str = "-",
                    budget: FetchBudget | None = None) -> tuple[str, bytes]:
        """-> (mime type, bytes); raises Refusal with a 4xx/5xx JSON reply. ``owner``: the
        request asking (fair turns); ``budget``: what that request may still fetch."""
        hit = self._cached(url)
        if hit is not None:
            if budget is not None:
                budget.take(len(hit[1]), param)
            return hit
        async with self.slots.slot(owner):
            try:
                mime, data = await asyncio.wait_for(self._fetch(url, param, budget),
                                                    self.policy.timeout_s)
            except TimeoutError:
                raise _refuse(param, f"fetching {url} took longer than "
                              f"{self.policy.timeout_s}s", 504, "fetch_timeout") from None
        self._store(url, mime, data)
        return mime, data

    async def check(self, url: str, param: str, timeout_s: float | None = None) -> None:
        """Refuse a URL our own fetch would refuse (scheme, host, addresses), without
        fetching it: for backends that fetch URLs themselves. Redirects their fetch follows
        are theirs; only inlining (``fetches_urls: false``) closes that."""
        limit = min(self.policy.timeout_s, timeout_s or self.policy.timeout_s)
        try:
            await asyncio.wait_for(self._vet(url, param), limit)
        except TimeoutError:
            raise _refuse(param, f"resolving the host of {url[:200]} took longer than "
                          f"{limit:.1f}s", 504, "fetch_timeout") from None

    async def _vet(self, url: str, param: str) -> tuple[SplitResult, str, int, list[str]]:
        """The URL split, its host, port and the addresses it resolves to, all allowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise _refuse(param, f"only https URLs can be fetched, not {url[:80]}")
        if parts.scheme == "http" and not self.policy.allow_http:
            raise _refuse(param, "plain http URLs are not fetched (use https)")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise _refuse(param, "the URL has an invalid port") from None
        try:
            ips = await resolve(host, port)
        except (OSError, UnicodeError):
            raise _refuse(param, f"cannot resolve host {host[:200]}", 400,
                          "url_unresolvable") from None
        bad = [ip for ip in ips if not address_allowed(ip, self.policy, host)]
        if bad or not ips:
            raise _refuse(param, f"host {host[:200]} resolves to a non-public address "
                          f"({', '.join(bad) or 'none'}); fetching it is not allowed")
        return parts, host, port, ips

    async def _fetch(self, url: str, param: str, budget: FetchBudget | None
                     ) -> tuple[str, bytes]:
        current = url
        for _ in range(self.policy.max_redirects + 1):
            parts, host, port, ips = await self._vet(current, param)
            resp = await self._connect(parts, ips, host, port, current, param)
            try:
                if resp.status_code in (301, 302, 303, 307, 308):
                    location = resp.headers.get("location")
                    if not location:
                        raise _refuse(param, "redirect without a location", 502, "fetch_failed")
                    current = urljoin(current, location)
                    continue
                if resp.status_code != 200:
                    raise _refuse(param, f"fetching {current} returned HTTP {resp.status_code}",
                                  502 if resp.status_code >= 500 else 400, "fetch_failed")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                    raise _refuse(param, f"{current} is {declared} bytes, over the "
                                  f"{self.policy.max_bytes}-byte limit", 413, "fetch_too_large")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > self.policy.max_bytes:
                        raise _refuse(param, f"{current} is over the {self.policy.max_bytes}-"
                                      "byte limit", 413, "fetch_too_large")
                    if budget is not None:
                        budget.take(len(chunk), param)
                    chunks.append(chunk)
                mime = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                return mime, b"".join(chunks)
            finally:
                await resp.aclose()
        raise _refuse(param, f"more than {self.policy.max_redirects} redirects", 400,
                      "fetch_failed")

    async def _connect(self, parts: SplitResult, ips: list[str], host: str, port: int,
                       current: str, param: str) -> httpx.Response:
        """GET from the checked addresses themselves, in turn (no second DNS lookup)."""
        last: Exception | None = None
        for ip in ips:
            netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            req = self.client.build_request(
                "GET", pinned, headers={"host": parts.netloc.rsplit("@", 1)[-1]},
                extensions={"sni_hostname": host})
            try:
                return await self.client.send(req, stream=True)
            except httpx.ConnectError as exc:
                last = exc
            except httpx.HTTPError as exc:
                last = exc
                break
        raise _refuse(param, f"fetching {current} failed: {last.__class__.__name__}", 502,
                      "fetch_failed")
