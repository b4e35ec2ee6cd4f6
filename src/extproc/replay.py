"""`extproc replay`: send request fixtures through a running Envoy and check what happened.

A fixture is a YAML or JSON file: a request (method, path, headers, body / body_file /
body_text, or ``form`` for a multipart upload) and expectations (status, error code, which
backend and model served it, response fields, and, with ``--config`` naming emulated backends,
what the backend received). Strings ``@data-url:<file>`` in a body become data URLs of that file
and ``@file:<file>`` in a form an uploaded file (relative to the fixture), so media stays
readable. ``--record DIR`` writes each fixture back with the expectations observed.
"""

from __future__ import annotations

import base64
import fnmatch
import mimetypes
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Config, backend_endpoint, load_config


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FixtureRequest(_M):
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = {}
    body: Any = None
    body_file: str | None = None
    body_text: str | None = None
    form: dict[str, str] | None = Field(default=None, description="a multipart/form-data "
                                        "upload: text fields, and @file:<path> for files")


class BackendExpect(_M):
    model: str | None = None
    part_types: list[str] | None = Field(default=None, description="types of the last "
                                         "message's content parts, in order")
    absent_keys: list[str] = []
    keys: dict[str, Any] = {}
    headers: dict[str, str] = {}
    absent_headers: list[str] = []
    record: dict[str, Any] = Field(default={}, description="dotted paths in the emulator's "
                                   "record of the request: path, api, file.size, file.sha256")


class Expect(_M):
    status: int | None = None
    error_code: str | None = None
    error_param: str | None = None
    backend: str | None = None
    model: str | None = None
    headers: dict[str, str] = {}
    response: dict[str, Any] = {}
    backend_received: BackendExpect | None = None


class Fixture(_M):
    name: str
    description: str = ""
    request: FixtureRequest
    expect: Expect = Expect()


def lookup(data: Any, dotted: str) -> Any:
    """``choices.0.message.content`` -> the value, or a KeyError naming where it stopped."""
    cur = data
    for part in dotted.split("."):
        if isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(part)
    return cur


def _matches(expected: Any, got: Any) -> bool:
    if isinstance(expected, str) and isinstance(got, str) and any(c in expected for c in "*?"):
        return fnmatch.fnmatchcase(got, expected.replace("[", "[[]"))  # only * and ? are wild
    return bool(expected == got)


def _expand(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.startswith("@data-url:"):
        path = base / value[len("@data-url:"):]
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    if isinstance(value, dict):
        return {k: _expand(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, base) for v in value]
    return value


def load_fixture(path: Path) -> Fixture:
    text = path.read_text(encoding="utf-8")
    data = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return Fixture.model_validate(data)


def request_body(fx: Fixture, base: Path) -> bytes | None:
    r = fx.request
    if r.body_text is not None:
        return r.body_text.encode()
    if r.body_file is not None:
        raw = (base / r.body_file).read_bytes()
        return orjson.dumps(_expand(orjson.loads(raw), base))
    if r.body is not None:
        return orjson.dumps(_expand(r.body, base))
    return None


def send(client: httpx.Client, fx: Fixture, base: Path) -> httpx.Response:
    r = fx.request
    if r.form is not None:  # multipart: httpx writes the boundary and content type
        files = {k: (Path(v[6:]).name, (base / v[6:]).read_bytes())
                 for k, v in r.form.items() if v.startswith("@file:")}
        data = {k: v for k, v in r.form.items() if k not in files}
        return client.request(r.method, r.path, headers=r.headers, data=data, files=files)
    headers = {"content-type": "application/json", **r.headers}
    return client.request(r.method, r.path, headers=headers, content=request_body(fx, base))


class Backends:
    """Reads what emulated backends received (their /_emulator/requests log)."""

    def __init__(self, cfg: Config | None):
        self.urls = {}
        for b in cfg.backends if cfg else ():
            ep = backend_endpoint(b.url)
            self.urls[b.name] = f"{ep.scheme}://{ep.hostname or ep.host}:{ep.port}"

    def received(self, backend: str, request_id: str) -> dict[str, Any] | None:
        url = self.urls.get(backend)
        if not url:
            return None
        try:
            log = httpx.get(url + "/_emulator/requests", timeout=5,
                            verify=False).json()["requests"]  # emulators' own certificates
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        for rec in reversed(log):
            if rec.get("headers", {}).get("x-request-id") == request_id:
                return rec
        return None


def check(fx: Fixture, resp: httpx.Response, got: dict[str, Any] | None) -> list[str]:
    """Every expectation that does not hold, as 'where: expected X, got Y'."""
    e, diffs = fx.expect, []

    def cmp(where: str, expected: Any, actual: Any) -> None:
        if not _matches(expected, actual):
            diffs.append(f"{where}: expected {expected!r}, got {actual!r}")

    def at(where: str, source: Any, expected: dict[str, Any]) -> None:
        """Each dotted path of ``source`` against its expected value."""
        for path, value in expected.items():
            try:
                cmp(f"{where}{path}", value, lookup(source, path))
            except KeyError as exc:
                diffs.append(f"{where}{path}: missing (no {exc.args[0]!r})")

    if e.status is not None:
        cmp("status", e.status, resp.status_code)
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else {}
    if e.error_code is not None:
        cmp("error.code", e.error_code, err.get("code"))
    if e.error_param is not None:
        cmp("error.param", e.error_param, err.get("param"))
    if e.backend is not None:
        cmp("backend", e.backend, resp.headers.get("x-extproc-backend"))
    if e.model is not None:
        cmp("model", e.model, resp.headers.get("x-extproc-model"))
    for name, value in e.headers.items():
        cmp(f"headers.{name}", value, resp.headers.get(name))
    at("response.", body, e.response)
    if e.backend_received is not None:
        be = e.backend_received
        if got is None:
            diffs.append("backend_received: no request with this x-request-id reached the "
                         "backend (or its log is not readable: pass --config)")
            return diffs
        data = got.get("json") or {}
        if be.model is not None:
            cmp("backend_received.model", be.model, data.get("model"))
        if be.part_types is not None:
            content = (data.get("messages") or [{}])[-1].get("content")
            types = [p.get("type") for p in content] if isinstance(content, list) else ["string"]
            cmp("backend_received.part_types", be.part_types, types)
        for key in be.absent_keys:
            try:
                lookup(data, key)
                diffs.append(f"backend_received.{key}: expected absent, but it is there")
            except KeyError:
                pass
        at("backend_received.", data, be.keys)
        at("backend_received.record.", got, be.record)
        headers = got.get("headers") or {}
        for name, value in be.headers.items():
            cmp(f"backend_received.headers.{name}", value, headers.get(name))
        for name in be.absent_headers:
            if name in headers:
                diffs.append(f"backend_received.headers.{name}: expected absent, got "
                             f"{headers[name]!r}")
    return diffs


def observed(resp: httpx.Response, got: dict[str, Any] | None) -> dict[str, Any]:
    """What happened, as an ``expect`` block (for --record)."""
    out: dict[str, Any] = {"status": resp.status_code}
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        out["error_code"] = body["error"].get("code")
    for key, header in (("backend", "x-extproc-backend"), ("model", "x-extproc-model")):
        if resp.headers.get(header):
            out[key] = resp.headers[header]
    if got and isinstance(got.get("json"), dict):
        data = got["json"]
        rec: dict[str, Any] = {"model": data.get("model")}
        content = (data.get("messages") or [{}])[-1].get("content")
        if isinstance(content, list):
            rec["part_types"] = [p.get("type") for p in content]
        out["backend_received"] = rec
    return out


def run(paths: list[str], envoy: str, config: str | None, record: str | None,
        timeout: float, out: Any = sys.stdout) -> int:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml", ".json")
                        and x.parent.name != "media") if p.is_dir() else [p]
    backends = Backends(load_config(config) if config else None)
    rows: list[tuple[str, str, list[str]]] = []
    with httpx.Client(base_url=envoy.rstrip("/"), timeout=timeout) as client:
        for f in files:
            try:
                fx = load_fixture(f)
            except (ValidationError, yaml.YAMLError, orjson.JSONDecodeError, OSError) as exc:
                rows.append((f.name, "ERROR", ["not a fixture: " + " ".join(str(exc).split())[:300]]))
                continue
            try:
                resp = send(client, fx, f.parent)
            except httpx.HTTPError as exc:
                rows.append((fx.name, "ERROR", [f"request failed: {exc!r}"]))
                continue
            backend = resp.headers.get("x-extproc-backend")
            got = backends.received(backend, resp.headers.get("x-request-id", "")) \
                if backend else None
            if record:
                data = fx.model_dump(exclude_defaults=True)
                data["expect"] = observed(resp, got)
                target = Path(record) / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(yaml.safe_dump(data, sort_keys=False, width=100))
                rows.append((fx.name, "RECORDED", [str(target)]))
                continue
            diffs = check(fx, resp, got)
            rows.append((fx.name, "FAIL" if diffs else "pass", diffs))
    width = max([len(r[0]) for r in rows] + [7])
    print(f"{'fixture':{width}}  result", file=out)
    print(f"{'-' * width}  ------", file=out)
    for name, result, details in rows:
        print(f"{name:{width}}  {result}", file=out)
        for d in details:
            print(f"{'':{width}}    {d}", file=out)
    bad = sum(r[1] in ("FAIL", "ERROR") for r in rows)
    print(f"\n{len(rows) - bad} passed, {bad} failed", file=out)
    return 1 if bad or not rows else 0
