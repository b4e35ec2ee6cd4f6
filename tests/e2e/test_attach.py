"""The "attach to your own Envoy" snippets (`extproc envoy --snippets`), pasted as they are into
a plain Envoy config, route real traffic. The snippets name the service at the demo address
(127.0.0.1:50051)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from extproc.config import load_config
from extproc.render import render_snippets
from extproc_dev.stack import Stack, envoy_binary, free_port, wait_port

from .conftest import demo_config_on_free_ports, write_config

ROOT = Path(__file__).resolve().parents[2]


def snippet_blocks(path: Path) -> list[dict]:
    """The YAML blocks `extproc envoy --config PATH --snippets` prints."""
    text = render_snippets(load_config(path))
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_snippets_pasted_into_a_plain_envoy_route_traffic(tmp_path: Path) -> None:
    # The service and emulators: the demo config (the service at its demo address), rendered
    # into snippets as a user would from the config the service runs (the fast lane's routes
    # name the backends' addresses).
    cfg = demo_config_on_free_ports()
    cfg["service"]["port"] = load_config(ROOT / "config" / "demo.yaml").service.port
    path = write_config(tmp_path, cfg)
    filters, route, pool, service = snippet_blocks(path)
    svc_addr = service["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    with socket.socket() as s:  # the snippets name the demo's service address
        if s.connect_ex((svc_addr["address"], svc_addr["port_value"])) == 0:
            pytest.fail(f"{svc_addr} is busy (is `make run` running?); this test needs it")
    stack = Stack(path, workdir=str(tmp_path), env={"DEMO_OPENAI_KEY": "sk-x"})
    endpoints = []
    for b in cfg["backends"]:
        host, port = b["url"].split("//")[1].split("/")[0].split(":")
        endpoints.append({"endpoint": {"address": {"socket_address": {
            "address": host, "port_value": int(port)}}}})
    listen = free_port()
    plain = {  # a user's own Envoy: their listener and HCM, our four pieces pasted in
        "static_resources": {
            "listeners": [{
                "name": "mine",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "mine", **route, **filters}}]}]}],
            "clusters": [service] + [
                {**c, "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": c["name"],
                                     "endpoints": [{"lb_endpoints": endpoints}]}}
                for c in pool["clusters"]],
        }
    }
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    stack.start()
    envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "plain.yaml"),
                              "--concurrency", "1", "--base-id", "4242", "-l", "warn"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", listen, proc=envoy)
        url = f"http://127.0.0.1:{listen}/v1/chat/completions"
        r = httpx.post(url, json={"model": "coder-big", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-extproc-backend"] == "local-llamacpp"
        assert r.headers["x-extproc-model"] == "qwen3-coder-40b-q5"
        forged = httpx.post(url, headers={"x-extproc-cluster": "extproc_service"}, json={
            "model": "coder", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert forged.headers["x-extproc-backend"] == "local-vllm"
        assert httpx.post(url, json={"model": "nope", "messages": []}).status_code == 404
        # The pasted access log brings the decision back to the service with its outcome.
        deadline, rec = time.monotonic() + 5, None
        while rec is None and time.monotonic() < deadline:
            time.sleep(0.1)
            rec = next((orjson.loads(x) for x in stack.log_path("service").read_text()
                        .splitlines() if '"coder-big"' in x and '"routing.decision"' in x), None)
        assert rec is not None and rec["outcome"] == "ok" and rec["status"] == 200
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
        stack.stop()
