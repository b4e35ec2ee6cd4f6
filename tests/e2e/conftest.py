"""Shared fixtures: configs on free loopback ports and a real stack (emulators + service + Envoy)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from extproc_dev.stack import Stack, free_port

BACKEND_KEY = "sk-backend-secret-123"


def stack_config(backends: list[dict[str, Any]], models: list[dict[str, Any]],
                 **extra: Any) -> dict[str, Any]:
    """A config with every port free; backends given as {name, preset, models, ...}."""
    out_backends = []
    for b in backends:
        b = dict(b)
        b.setdefault("url", f"http://127.0.0.1:{free_port()}/v1")
        b["models"] = [{"name": m} if isinstance(m, str) else m for m in b["models"]]
        out_backends.append(b)
    cfg: dict[str, Any] = {
        "service": {"host": "127.0.0.1", "port": free_port(), "log_level": "info",
                    "metrics_port": free_port()},
        # (the default, auto, is the compiled lane here; EXTPROC_TEST_LANE=lua: every stack
        # with the Lua lane, unless a test says)
        "envoy": {"listen_port": free_port(), "admin_port": free_port(),
                  **({"fast_lane_compiled": False}
                     if os.environ.get("EXTPROC_TEST_LANE") == "lua" else {})},
        "backends": out_backends,
        "models": models,
    }
    for key, value in extra.items():  # service/envoy overrides keep the free ports
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_stack(tmp: Path, cfg: dict[str, Any], **kw: Any) -> Stack:
    return Stack(write_config(tmp, cfg), workdir=str(tmp), env={"E2E_BACKEND_KEY": BACKEND_KEY},
                 **kw).start()


def received(stack: Stack, backend: str) -> list[dict[str, Any]]:
    r = httpx.get(stack.backend_url(backend) + "/_emulator/requests", timeout=5, verify=False)
    return [x for x in r.json()["requests"] if x["method"] == "POST"]


def wait_line(stack: Stack, log: str, rid: str, marker: str) -> dict[str, Any]:
    """The JSON line of a process's log naming this request id and marker (decision records
    arrive with Envoy's next access log batch)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in stack.log_path(log).read_text().splitlines():
            if rid in line and marker in line:
                return orjson.loads(line)
        time.sleep(0.05)
    raise AssertionError(f"no {marker} line for {rid} in {log}")


def read_answer(sock: socket.socket, max_s: float = 10.0) -> bytes:
    """A raw HTTP/1.1 answer with a JSON body: read until it is complete, the peer closes, or
    ``max_s`` has passed."""
    t0, answer = time.monotonic(), b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk or time.monotonic() - t0 > max_s:
            break
        answer += chunk
    return answer


def reset(stack: Stack, backend: str) -> None:
    httpx.post(stack.backend_url(backend) + "/_emulator/reset", timeout=5, verify=False)


@pytest.fixture(scope="module")
def routing_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Four backends: two vLLM-like, one llama.cpp-like (with a key), one that is dead."""
    cfg = stack_config(
        backends=[
            {"name": "vllm-a", "preset": "vllm", "models": ["qwen3-coder-25b", "shared-7b"]},
            {"name": "llama-b", "preset": "llamacpp", "models": ["coder-40b-q5"],
             "api_key_env": "E2E_BACKEND_KEY"},
            {"name": "vllm-c", "preset": "vllm", "models": ["shared-7b-awq", "big-1"]},
            {"name": "dead", "preset": "vllm", "models": ["big-1"]},
        ],
        models=[
            {"name": "qwen3-coder-25b", "aliases": ["coder"],
             "candidates": [{"backend": "vllm-a", "model": "qwen3-coder-25b"}]},
            {"name": "coder-40b", "candidates": [{"backend": "llama-b", "model": "coder-40b-q5"}]},
            {"name": "shared", "candidates": [{"backend": "vllm-c", "model": "shared-7b-awq"},
                                              {"backend": "vllm-a", "model": "shared-7b"}]},
            {"name": "only-dead", "candidates": [{"backend": "dead", "model": "big-1"}]},
            {"name": "failover", "candidates": [{"backend": "dead", "model": "big-1"},
                                                {"backend": "vllm-c", "model": "big-1"}]},
        ],
        default_model="coder",
    )
    stack = start_stack(tmp_path_factory.mktemp("routing"), cfg, dead_backends=("dead",))
    try:
        yield stack
    finally:
        stack.stop()


ROOT = Path(__file__).resolve().parents[2]


def demo_config_on_free_ports() -> dict[str, Any]:
    """config/demo.yaml with every port moved to a free one (same stack, no clashes)."""
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["service"].update(port=free_port(), metrics_port=free_port())
    cfg["envoy"].update(listen_port=free_port(), admin_port=free_port())
    for b in cfg["backends"]:
        base = b["url"].rsplit(":", 1)[0]
        path = b["url"].split("/", 3)[3] if b["url"].count("/") >= 3 else ""
        b["url"] = f"{base}:{free_port()}/{path}"
    return cfg


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("demo")
    stack = Stack(write_config(tmp, demo_config_on_free_ports()), workdir=str(tmp),
                  env={"DEMO_OPENAI_KEY": "sk-demo-test"}).start()
    try:
        yield stack
    finally:
        stack.stop()


def fetch_refusal(url: str, **policy: Any) -> Any:
    """Fetch ``url`` under a policy and return the Refusal; fail if it was not refused."""
    import asyncio

    from extproc.core.errors import Refusal
    from extproc.effects.fetch import Fetcher, FetchPolicy

    async def go() -> Refusal:
        f = Fetcher(FetchPolicy(**policy))
        try:
            await f.fetch(url, "messages[0].content[0]")
        except Refusal as exc:
            return exc
        finally:
            await f.aclose()
        raise AssertionError(f"fetching {url} was not refused")

    return asyncio.run(go())
