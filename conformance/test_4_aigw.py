"""Attached to a real Envoy AI Gateway (issue 23): `aigw run` (installed into its cached venv,
as the benchmark's target e) with AIGW routes to an emulated vLLM, first alone, then with our
route stage attached the way docs/deployment.md says: the EnvoyExtensionPolicy shipped in
deploy/kubernetes/extension-policy.yaml (read from there, so the shipped file is what is
tested), and our filter ordered before AIGW's by deploy/kubernetes/filter-order.yaml (read
from there too). Each case is printed with what AIGW alone answered for the same request."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.e2e.conftest import stack_config, start_stack, wait_line

from extproc_dev.stack import free_port

from .conftest import REPORT, timed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from media import text_image  # noqa: E402

PNG = base64.b64encode(text_image("INVOICE 4711")).decode()
IMAGE = f"data:image/png;base64,{PNG}"
# name -> (model, content): each sent alone to AIGW, then to AIGW with us attached
# AIGW's own access log beside the one to us: one line per request with its id.
ACCESS_LOG_SETTING = {
    "format": {"type": "Text", "text": "aigw.access %REQ(X-REQUEST-ID)% %RESPONSE_CODE%\n"},
    "sinks": [{"type": "File", "file": {"path": "/dev/stdout"}}]}
CASES: dict[str, tuple[str, Any]] = {
    "plain text": ("seeing", "hi"),
    "an alias only we know": ("nick", "hi"),
    "an HF-style image part": ("seeing", [{"type": "text", "text": "what is this?"},
                                          {"type": "image", "url": IMAGE}]),
    "input_image in a chat message": ("seeing", [{"type": "text", "text": "what is this?"},
                                                 {"type": "input_image", "image_url": IMAGE}]),
    "an image for the text-only model": ("blind", [
        {"type": "text", "text": "what is the invoice number?"},
        {"type": "image_url", "image_url": {"url": IMAGE}}]),
}


def shipped(name: str, port: int | None = None) -> list[dict[str, Any]]:
    """A deploy/kubernetes/ file's documents, in the test's namespace, aimed at its Gateway;
    references to our Service become an Envoy Gateway Backend at ``port`` (none: the EnvoyProxy
    without its access log to us, for AIGW alone)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / name).read_text()))
    ours = [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "llm-extproc",
             "port": port}]
    for doc in docs:
        doc["metadata"] = {**doc["metadata"], "namespace": "default"}
        spec = doc["spec"]
        for ref in spec.get("targetRefs", []):
            if ref["kind"] == "Gateway":
                ref["name"] = "aigw-run"
        for ext in spec.get("extProc", []):
            ext["backendRefs"] = ours
        if doc["kind"] == "EnvoyProxy" and port is None:
            del spec["telemetry"]
        elif doc["kind"] == "EnvoyProxy":
            for setting in spec["telemetry"]["accessLog"]["settings"]:
                for sink in setting["sinks"]:
                    sink["als"]["backendRefs"] = ours
            spec["telemetry"]["accessLog"]["settings"].append(ACCESS_LOG_SETTING)
    return docs


def dump(docs: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)


def policy_documents(port: int) -> str:
    """Our service as an Envoy Gateway Backend, and the shipped EnvoyExtensionPolicy pointed
    at it and at this Gateway."""
    # (in a cluster the Service; here an Envoy Gateway Backend at our port)
    backend = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "Backend",
               "metadata": {"name": "llm-extproc", "namespace": "default"},
               "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": port}}]}}
    return dump([backend, *shipped("extension-policy.yaml", port),
                 *shipped("filter-order.yaml", port)])


def ours(emu: int, aux: int, port: int) -> dict[str, Any]:
    return {
        "service": {"host": "127.0.0.1", "port": port, "metrics_port": 0},
        "ai_gateway": {"model_header": "x-ai-eg-model"},
        "backends": [
            {"name": "emu", "preset": "vllm", "url": f"http://127.0.0.1:{emu}/v1",
             "discovery": {"enabled": False},
             "models": [{"name": "seeing", "capabilities": ["vision"]},
                        {"name": "blind", "capabilities": []}]},
            {"name": "aux", "preset": "openai", "url": f"http://127.0.0.1:{aux}/v1",
             "models": [{"name": "ocr", "capabilities": ["vision"]}]}],
        "models": [{"name": "seeing", "aliases": ["nick"],
                    "candidates": [{"backend": "emu", "model": "seeing"}]},
                   {"name": "blind", "candidates": [{"backend": "emu", "model": "blind"}]}],
        "vision": {"backend": "aux", "model": "ocr"},
    }


def ask(url: str, emu: str, model: str, content: Any) -> dict[str, Any]:
    """One request; its status and what the backend received (None: nothing)."""
    httpx.post(emu + "/_emulator/reset", timeout=5)
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]})
    got = [x for x in httpx.get(emu + "/_emulator/requests", timeout=5).json()["requests"]
           if x["method"] == "POST"]
    return {"status": r.status_code, "body": r.text[:200], "received": got[-1] if got else None}


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("aigw")
    procs = bench.Procs(tmp)
    emu_port, aux_port, svc_port = free_port(), free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    cards = {"seeing": {"capabilities": ["completion", "vision"]},
             "blind": {"capabilities": ["completion"]}}
    try:
        procs.start("emulator", [sys.executable, "-m", "extproc_dev.emulators", "--flavour",
                                 "vllm", "--name", "emu", "--models", "seeing,blind",
                                 "--cards", json.dumps(cards),
                                 "--port", str(emu_port)], emu_port)
        procs.start("aux", [sys.executable, "-m", "extproc_dev.emulators", "--flavour", "ocr",
                            "--name", "aux", "--models", "ocr", "--port", str(aux_port)],
                    aux_port, timeout=120)
        (tmp / "ours.yaml").write_text(yaml.safe_dump(ours(emu_port, aux_port, svc_port)))
        procs.start("service", [sys.executable, "-m", "extproc.cli", "serve", "--config",
                                str(tmp / "ours.yaml")], svc_port)
        base = (Path(__file__).parent / "aigw_attached.yaml").read_text().replace(
            "${EMU_PORT}", str(emu_port))
        out: dict[str, dict] = {}
        for phase, config in (("alone", base + dump(shipped("filter-order.yaml"))),
                              ("attached", base + policy_documents(svc_port))):
            url = timed(f"aigw {phase} (install on first use, start)", lambda c=config, p=phase:
                        bench.start_aigw(procs, tmp, c, f"aigw-{p}", ready_model="seeing"))
            assert url, f"Envoy AI Gateway ({phase}) did not start: see {tmp}/aigw-{phase}.log"
            out[phase] = {case: ask(url, emu, *req) for case, req in CASES.items()}
            last = out[phase][list(CASES)[-1]]["received"]["headers"]["x-request-id"]
            deadline = time.monotonic() + 10  # (access logs are written in batches)
            while phase == "attached" and time.monotonic() < deadline and not (
                    last in (tmp / "service.log").read_text() and last in "".join(
                        p.read_text() for p in (tmp / "aigw-attached" / "state").glob(
                            "envoy-runs/*/stdout.log"))):
                time.sleep(0.2)
            procs.stop_one(f"aigw-{phase}")
        out["logs"] = {"service": tmp / "service.log", "aigw": tmp / "aigw-attached" / "state"}
        yield out
    finally:
        procs.stop()


def parts(received: dict | None) -> list[str]:
    content = (received or {}).get("json", {}).get("messages", [{}])[0].get("content")
    return [p.get("type", "?") for p in content] if isinstance(content, list) else ["string"]


@pytest.mark.parametrize("case", list(CASES))
def test_attached_to_aigw(answers: dict[str, dict], case: str) -> None:
    alone, attached = answers["alone"][case], answers["attached"][case]
    note = (f"AIGW alone: {alone['status']}" + (f" (backend got {parts(alone['received'])})"
                                                if alone["received"] else "")
            + f"; with llm-extproc: {attached['status']}")
    REPORT.aigw[case] = note + (f" (backend got {parts(attached['received'])})"
                                if attached["received"] else "")
    assert attached["status"] == 200, attached["body"]
    got = attached["received"]
    # Our internal headers never reach a backend inside AIGW.
    assert not [h for h in got["headers"] if h.startswith("x-extproc-")
                or h == "x-envoy-max-retries"], got["headers"]
    assert got["json"]["model"] == CASES[case][0].replace("nick", "seeing")
    # Our decision record, from AIGW's access log (the EnvoyProxy's sink to us), names the
    # request id AIGW gave the request...
    rid = got["headers"]["x-request-id"]
    records = [json.loads(line) for line in answers["logs"]["service"].read_text()
               .splitlines() if rid in line and '"routing.decision"' in line]
    # ...and so does AIGW's own access log; its route matched the public name we set in its
    # model header (an alias only we know reached the backend through AIGW's rule for it).
    assert f"aigw.access {rid} 200" in "".join(
        p.read_text() for p in answers["logs"]["aigw"].glob("envoy-runs/*/stdout.log"))
    assert records and records[0]["outcome"] == "ok" and records[0]["status"] == 200, records
    assert records[0]["public_model"] == "seeing" if case != "an image for the text-only model" \
        else records[0]["public_model"] == "blind"
    if case == "an alias only we know":
        assert alone["status"] == 404
    if case in ("an HF-style image part", "input_image in a chat message"):
        assert alone["status"] == 400  # AIGW refuses the shape itself
        assert parts(got) == ["text", "image_url"]
    if case == "an image for the text-only model":
        assert alone["status"] == 400  # the backend refuses the image
        assert parts(got) == ["text", "text"] and "4711" in str(got["json"])  # described


def test_the_deploy_docs_say_what_this_test_shows(answers: dict[str, dict]) -> None:
    """docs/deployment.md quotes these answers: a change in what AIGW or we answer fails here
    until the docs say it."""
    text = " ".join((ROOT / "docs" / "deployment.md").read_text().split())
    for case, label in (("an alias only we know", "an alias"),
                        ("an HF-style image part", "an HF-style image part"),
                        ("input_image in a chat message", "`input_image`"),
                        ("an image for the text-only model", "an image for a text-only model")):
        said = f"{label} {answers['alone'][case]['status']} / {answers['attached'][case]['status']}"
        assert said in text, f"docs/deployment.md should say: {said}"
    keep = KEEP_REQUEST_ID["spec"]["headers"]["requestID"]
    assert f"`headers: {{requestID: {keep}}}`" in text


# ---------------------------------------------------------------- our Envoy in front of AIGW

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}]


# What makes AIGW keep the request id our Envoy sends it (docs/deployment.md), instead of
# making its own.
KEEP_REQUEST_ID = {
    "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "ClientTrafficPolicy",
    "metadata": {"name": "keep-request-id", "namespace": "default"},
    "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                             "name": "aigw-run"}],
             "headers": {"requestID": "PreserveOrGenerate"}}}




@pytest.fixture(scope="module")
def in_front(answers: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The other layout: our Envoy and service (both stages) with plain AIGW as one backend
    (after ``answers``: one aigw at a time, its port is fixed) and a spare emulator beside."""
    tmp = tmp_path_factory.mktemp("front")
    procs = bench.Procs(tmp)
    emu_port, spare_port = free_port(), free_port()
    stack = None
    try:
        for name, port, models in (("emu", emu_port, "seeing,blind"),
                                   ("spare", spare_port, "spare-model")):
            procs.start(name, [sys.executable, "-m", "extproc_dev.emulators", "--flavour",
                               "vllm", "--name", name, "--models", models, "--port",
                               str(port)], port)
        order = shipped("filter-order.yaml")
        order[0]["spec"]["telemetry"] = {"accessLog": {"settings": [ACCESS_LOG_SETTING]}}
        base = (Path(__file__).parent / "aigw_attached.yaml").read_text().replace(
            "${EMU_PORT}", str(emu_port)) + dump([*order, KEEP_REQUEST_ID])
        aigw = bench.start_aigw(procs, tmp, base, "aigw-behind", ready_model="seeing")
        assert aigw, f"Envoy AI Gateway did not start: see {tmp}/aigw-behind.log"
        cfg = stack_config(
            backends=[{"name": "aigw", "preset": "openai", "url": aigw + "/v1",
                       "discovery": {"enabled": False},
                       "models": [{"name": "seeing", "capabilities": ["tools", "vision"]}]},
                      {"name": "spare", "preset": "vllm", "url": f"http://127.0.0.1:{spare_port}/v1",
                       "models": [{"name": "spare-model", "capabilities": ["tools"]}]}],
            models=[{"name": "tools-model", "candidates": [
                {"backend": "aigw", "model": "seeing"},
                {"backend": "spare", "model": "spare-model"}]}])
        stack = start_stack(tmp, cfg, dead_backends=("aigw", "spare"))  # (none emulated)
        yield {"stack": stack, "emu": f"http://127.0.0.1:{emu_port}",
               "aigw_state": tmp / "aigw-behind" / "state"}
    finally:
        if stack is not None:
            stack.stop()
        procs.stop()


def test_in_front_a_forced_tool_call_aigw_botches_is_retried_on_the_next(in_front: dict
                                                                          ) -> None:
    stack, emu = in_front["stack"], in_front["emu"]
    httpx.post(emu + "/_emulator/reset", timeout=5)
    httpx.post(emu + "/_emulator/behaviour", json={"ignore_tools": True}, timeout=5)
    r = httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=60, json={
        "model": "tools-model", "tools": WEATHER, "tool_choice": "required",
        "messages": [{"role": "user", "content": "weather in Paris?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["tool_calls"]
    assert r.headers["x-extproc-backend"] == "spare"
    rec = wait_line(stack, "service", r.headers["x-request-id"], '"routing.decision"')
    assert [a.get("backend") for a in rec["attempts"]] == ["aigw", "spare"]
    (behind,) = [x for x in httpx.get(emu + "/_emulator/requests", timeout=5).json()["requests"]
                 if x["method"] == "POST"]  # AIGW passed the first attempt on
    # Our record, AIGW's access log and what AIGW forwarded name the same request id.
    assert behind["headers"].get("x-request-id") == rec["request_id"]
    def access_log() -> str:  # (aigw keeps its Envoy's output per run under its state home)
        return "".join(p.read_text() for p in in_front["aigw_state"].glob(
            "envoy-runs/*/stdout.log"))

    deadline = time.monotonic() + 10
    while f"aigw.access {rec['request_id']} 200" not in access_log():
        assert time.monotonic() < deadline, "AIGW's access log does not name our request id"
        time.sleep(0.2)
    REPORT.aigw["our Envoy in front, a forced tool call AIGW's backend botches"] = (
        f"attempts {[a.get('backend') for a in rec['attempts']]}, 200 from spare; the request "
        f"id {rec['request_id'][:8]}... in our record, AIGW's access log and at its backend")
