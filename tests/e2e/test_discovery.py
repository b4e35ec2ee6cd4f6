"""Backends change while the gateway runs: models they load become routable by name, models
they drop stop being routed there, capabilities they report count, and a backend that answers
its model list with garbage or not at all changes nothing. Through a real Envoy, no config
edit, no restart."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from extproc_dev.stack import Stack

from ..media import data_url, text_image
from .conftest import received, reset, stack_config, start_stack


@pytest.fixture(scope="module")
def dstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(
        backends=[
            {"name": "vl", "preset": "vllm", "models": ["base"]},
            {"name": "ol", "preset": "ollama", "models": []},  # only what it lists
            {"name": "aux", "preset": "openai",
             "models": [{"name": "ocr", "capabilities": ["vision"]}]},
        ],
        models=[],
        vision={"backend": "aux", "model": "ocr"},
        discovery={"interval_s": 1, "timeout_s": 1, "max_backoff_s": 2},
    )
    stack = start_stack(tmp_path_factory.mktemp("discovery"), cfg)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def _fresh(dstack: Stack) -> None:
    for backend in ("vl", "ol"):
        reset(dstack, backend)


def load(stack: Stack, backend: str, models: list[str], cards: dict[str, Any] | None = None
         ) -> None:
    """The backend loads (or drops) models, as `ollama pull` or a vLLM LoRA load would."""
    httpx.post(stack.backend_url(backend) + "/_emulator/models",
               json={"models": models, "cards": cards or {}})


def eventually(check: Callable[[], bool], within: float = 10.0) -> float:
    """Seconds until ``check()`` held (fails after ``within``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, "did not happen in time"
        time.sleep(0.2)
    return time.monotonic() - t0


def listed(stack: Stack) -> dict[str, Any]:
    return {m["id"]: m for m in httpx.get(stack.envoy_url + "/v1/models").json()["data"]}


def chat(stack: Stack, model: str, content: Any = "hi") -> httpx.Response:
    return httpx.post(stack.envoy_url + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": content}]}, timeout=30)


def test_a_model_loaded_on_a_backend_becomes_routable_and_stops_when_dropped(
        dstack: Stack) -> None:
    load(dstack, "vl", ["base", "sql-lora"])
    took = eventually(lambda: "sql-lora" in listed(dstack))
    assert took < 5  # the interval here is 1 s
    r = chat(dstack, "sql-lora")
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "vl"
    entry = listed(dstack)["sql-lora"]["candidates"][0]
    assert entry["discovered"] and entry["context_length"] == 32768
    load(dstack, "vl", ["base"])  # (until the next poll, vLLM itself answers 404)
    eventually(lambda: chat(dstack, "sql-lora").json()["error"]["code"] == "model_not_found")
    assert chat(dstack, "base").status_code == 200  # declared, still listed


def test_a_model_one_backend_drops_is_served_by_the_other(dstack: Stack) -> None:
    load(dstack, "vl", ["base", "shared"])
    load(dstack, "ol", ["shared"])
    eventually(lambda: len(listed(dstack).get("shared", {}).get("candidates", [])) == 2)
    assert chat(dstack, "shared").headers["x-extproc-backend"] == "vl"
    load(dstack, "vl", ["base"])
    eventually(lambda: len(listed(dstack)["shared"]["candidates"]) == 1)
    r = chat(dstack, "shared")
    assert r.headers["x-extproc-backend"] == "ol" and r.headers["x-extproc-attempts"] == "1"
    load(dstack, "ol", [])


def test_capabilities_reported_by_ollama_decide_who_sees_images(dstack: Stack) -> None:
    load(dstack, "ol", ["seer:7b", "blind:3b"], {
        "seer:7b": {"capabilities": ["completion", "vision"]},
        "blind:3b": {"capabilities": ["completion"]}})
    eventually(lambda: {"seer:7b", "blind:3b"} <= set(listed(dstack)))
    reset(dstack, "ol")
    image = [{"type": "text", "text": "what does it say?"},
             {"type": "image_url", "image_url": {"url": data_url(
                 "image/png", text_image("INVOICE 4711"))}}]
    seer, blind = chat(dstack, "seer:7b", image), chat(dstack, "blind:3b", image)
    assert seer.status_code == blind.status_code == 200
    assert "x-extproc-vision" not in seer.headers
    assert blind.headers["x-extproc-vision"].startswith("substituted=1")
    to_seer, to_blind = received(dstack, "ol")
    assert to_seer["json"]["messages"][0]["content"][1]["type"] == "image_url"
    assert "INVOICE 4711" in to_blind["json"]["messages"][0]["content"][1]["text"]
    card = listed(dstack)["seer:7b"]["candidates"][0]
    assert card["capabilities"] == ["vision"] and card["capabilities_from"] == "detected"
    load(dstack, "ol", [])


@pytest.mark.parametrize("mode", ["garbage", "stall"])
def test_a_model_list_that_is_garbage_or_never_comes_changes_nothing(
        dstack: Stack, mode: str) -> None:
    load(dstack, "vl", ["base", "kept"])
    eventually(lambda: "kept" in listed(dstack))
    log = dstack.log_path("service")
    before = log.read_text().count('"discovery.failed"')
    httpx.post(dstack.backend_url("vl") + "/_emulator/behaviour", json={"catalog": mode})
    load(dstack, "vl", ["base"])  # what it would say now, were it readable
    time.sleep(4)  # several intervals, and the 1 s timeout
    assert "kept" in listed(dstack)  # still routed there (vLLM itself now answers 404)
    assert chat(dstack, "kept").headers["x-extproc-backend"] == "vl"
    assert log.read_text().count('"discovery.failed"') == before + 1  # logged once
    reset(dstack, "vl")
    eventually(lambda: "kept" not in listed(dstack))
    assert '"discovery.recovered"' in log.read_text()


def test_extproc_models_prints_what_each_model_can_do(dstack: Stack) -> None:
    load(dstack, "ol", ["seer:7b"], {"seer:7b": {"capabilities": ["completion", "vision"]}})
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "models", "--config",
                          dstack.config_path], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0][:3] == ["model", "backend", "served"]
    seer = next(r for r in rows if r[0] == "seer:7b")
    assert seer[1:5] == ["ol", "seer:7b", "vision", "(detected)"] and seer[-1] == "healthy"
    base = next(r for r in rows if r[0] == "base")
    assert base[3:5] == ["-", "(unknown)"] and base[5] == "32768"
    load(dstack, "ol", [])


def test_extproc_init_writes_a_config_from_live_backends(dstack: Stack, tmp_path) -> None:
    load(dstack, "ol", ["llava:7b"], {"llava:7b": {"capabilities": ["completion", "vision"],
                                                  "context": 8192}})
    urls = [dstack.backend_url("vl"), dstack.backend_url("ol") + "/v1"]
    out = tmp_path / "starter.yaml"
    r = subprocess.run([sys.executable, "-m", "extproc.cli", "init", "--backend", urls[0],
                        "--backend", urls[1], "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    cfg = yaml.safe_load(text)
    assert [b["preset"] for b in cfg["backends"]] == ["vllm", "ollama"]
    assert [m["name"] for m in cfg["backends"][1]["models"]] == ["llava:7b"]
    assert "reported: audio no, reasoning no, tools no, vision yes, context 8192" in text
    check = subprocess.run([sys.executable, "-m", "extproc.cli", "check", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    load(dstack, "ol", [])


def test_sdk_lists_discovered_models(dstack: Stack) -> None:
    """OpenAI-compatible clients read the enriched list as they always did."""
    load(dstack, "vl", ["base", "lora-b"])
    eventually(lambda: "lora-b" in listed(dstack))
    ids = [m.id for m in openai.OpenAI(base_url=dstack.envoy_url + "/v1", api_key="k",
                                       max_retries=0).models.list()]
    assert "lora-b" in ids and "base" in ids
