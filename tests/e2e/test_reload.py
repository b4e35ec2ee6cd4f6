"""Config reload without restart: a new alias takes effect; a broken config is refused and
traffic keeps flowing; requests in flight during a reload are not dropped."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import orjson
import yaml

from extproc_dev.stack import Stack

from .conftest import stack_config, start_stack


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})


def wait_for(pred, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def watched(tmp_path) -> tuple[dict, Stack]:
    """One backend, one model, the config file watched every 0.2 s."""
    cfg = stack_config(
        backends=[{"name": "a", "preset": "vllm", "models": ["m1"]}],
        models=[{"name": "pub", "candidates": [{"backend": "a", "model": "m1"}]}])
    cfg["service"]["reload_watch_s"] = 0.2
    return cfg, start_stack(tmp_path, cfg)


def test_reload_new_alias_broken_config_and_in_flight(tmp_path) -> None:
    cfg, stack = watched(tmp_path)
    path = tmp_path / "config.yaml"
    try:
        url = stack.envoy_url
        assert chat(url, "fresh-alias").status_code == 404
        # A slow request is in flight while the config changes under it.
        httpx.post(stack.backend_url("a") + "/_emulator/behaviour", json={"delay_s": 1.0})
        slow: list[int] = []
        t = threading.Thread(target=lambda: slow.append(chat(url, "pub").status_code))
        t.start()
        time.sleep(0.2)
        cfg["models"][0]["aliases"] = ["fresh-alias"]
        path.write_text(yaml.safe_dump(cfg))  # picked up by the file watch
        assert wait_for(lambda: chat(url, "fresh-alias").status_code == 200)
        t.join()
        assert slow == [200]
        httpx.post(stack.backend_url("a") + "/_emulator/behaviour", json={})
        # A broken config is refused with a logged error; the old one keeps serving.
        path.write_text("backends: [{name: a}]\n")
        os.kill(stack.procs["service"].pid, signal.SIGHUP)
        assert wait_for(lambda: "config.reload_refused" in stack.log_path("service").read_text())
        log = stack.log_path("service").read_text()
        assert "backends[0].url: field required" in log
        assert chat(url, "fresh-alias").status_code == 200
        assert chat(url, "pub").status_code == 200
        assert stack.procs["service"].poll() is None
    finally:
        stack.stop()


def test_watcher_survives_a_config_that_validates_but_cannot_be_built(tmp_path) -> None:
    """`fetch.ca_bundle: /nonexistent` passes validation but fails when the runtime is built:
    the file watcher used to die silently on it, and later valid edits were ignored."""
    cfg, stack = watched(tmp_path)
    path = tmp_path / "config.yaml"
    try:
        url = stack.envoy_url
        broken = {**cfg, "fetch": {"ca_bundle": "/nonexistent/ca.pem"}}
        path.write_text(yaml.safe_dump(broken))
        assert wait_for(lambda: "config.reload_refused" in stack.log_path("service").read_text())
        assert "/nonexistent/ca.pem" in stack.log_path("service").read_text()
        assert chat(url, "pub").status_code == 200  # the old config keeps serving
        time.sleep(0.3)
        cfg["models"][0]["aliases"] = ["after-the-broken-one"]
        path.write_text(yaml.safe_dump(cfg))  # no SIGHUP: the watcher must still be alive
        assert wait_for(lambda: chat(url, "after-the-broken-one").status_code == 200)
    finally:
        stack.stop()


def test_a_reload_that_changes_nothing_for_envoy_says_nothing(tmp_path) -> None:
    """The same file saved again: reloaded with no note. (The service is started for the lane
    `extproc up` settled from `auto`; a reload settles it alike, or it would compare the new
    config's render, Lua, with the running one's, compiled, and ask for an Envoy reload.)"""
    cfg, stack = watched(tmp_path)
    path = tmp_path / "config.yaml"
    try:
        assert stack.lane.startswith("fast lane: compiled"), stack.lane
        time.sleep(0.05)
        path.write_text(yaml.safe_dump(cfg))
        assert wait_for(lambda: "config.reloaded" in stack.log_path("service").read_text())
        (line,) = [x for x in stack.log_path("service").read_text().splitlines()
                   if "config.reloaded" in x]
        assert orjson.loads(line)["notes"] == []
    finally:
        stack.stop()
