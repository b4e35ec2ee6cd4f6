"""`extproc replay` runs the project's fixture set through the real Envoy demo stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from extproc_dev.stack import Stack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def replay(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", "replay", *args, "--envoy",
                           stack.envoy_url, "--config", stack.config_path],
                          capture_output=True, text=True, timeout=300)


def test_every_fixture_passes_against_the_demo_stack(demo_stack: Stack) -> None:
    r = replay(demo_stack, str(FIXTURES))
    assert r.returncode == 0, r.stdout + r.stderr
    count = len([f for f in FIXTURES.glob("*.yaml")])
    assert f"{count} passed, 0 failed" in r.stdout
    assert count >= 20


def test_wrong_expectation_fails_with_a_readable_diff(demo_stack: Stack, tmp_path) -> None:
    fx = yaml.safe_load((FIXTURES / "routing-alias.yaml").read_text())
    fx["expect"]["backend"] = "local-ollama"
    fx["expect"]["response"] = {"choices.0.message.content": "Goodbye*", "nope.x": 1}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(fx))
    r = replay(demo_stack, str(tmp_path / "wrong.yaml"))
    assert r.returncode == 1
    assert "FAIL" in r.stdout
    assert "backend: expected 'local-ollama', got 'local-vllm'" in r.stdout
    assert "response.choices.0.message.content: expected 'Goodbye*', got 'Hello from " \
        "local-vllm serving qwen3-coder-25b.'" in r.stdout
    assert "response.nope.x: missing (no 'nope')" in r.stdout
    assert "0 passed, 1 failed" in r.stdout


def test_record_writes_what_happened(demo_stack: Stack, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine.yaml").write_text(yaml.safe_dump({
        "name": "my traffic", "request": {"body": {"model": "coder-big", "messages": [
            {"role": "user", "content": "hi"}]}}}))
    r = replay(demo_stack, str(src), "--record", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout
    rec = yaml.safe_load((tmp_path / "out" / "mine.yaml").read_text())
    assert rec["expect"] == {"status": 200, "backend": "local-llamacpp",
                             "model": "qwen3-coder-40b-q5",
                             "backend_received": {"model": "qwen3-coder-40b-q5"}}
    # The recorded fixture replays green.
    assert replay(demo_stack, str(tmp_path / "out")).returncode == 0
