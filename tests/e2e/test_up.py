"""`extproc up`: Envoy and the service against backends the config names (here servers this
test runs itself, not the stack's emulators), in the foreground; Ctrl-C stops everything, and
a child that dies is reported with the end of its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from extproc_dev.stack import free_port, wait_port

from .conftest import stack_config


def _serve_backend(name: str, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "extproc_dev.emulators", "--flavour", "vllm",
                             "--name", name, "--models", "m1", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_port("127.0.0.1", port, proc=proc)
    return proc


def _children(config: Path) -> list[int]:
    """Pids of processes started for this config (the service's command line names it)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmd and str(config).encode() in cmd:
                out.append(int(entry.name))
    return out


def _up(config: Path, workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "up", "--config", str(config),
                             "--workdir", str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return proc, lines
    proc.kill()
    raise AssertionError("extproc up did not come up:\n" + "".join(lines))


def test_up_runs_envoy_and_the_service_against_the_configs_backends(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    backends = [_serve_backend(f"b{i}", p, tmp_path / f"b{i}.log") for i, p in enumerate(ports)]
    cfg = stack_config(
        backends=[{"name": f"b{i}", "preset": "vllm", "url": f"http://127.0.0.1:{p}/v1",
                   "models": ["m1"]} for i, p in enumerate(ports)],
        models=[{"name": "chat", "candidates": [{"backend": "b0", "model": "m1"},
                                                {"backend": "b1", "model": "m1"}]}])
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump(cfg))
    envoy = f"http://127.0.0.1:{cfg['envoy']['listen_port']}"
    try:
        proc, lines = _up(config, tmp_path / "run")
        banner = "".join(lines)
        assert f"Envoy on {envoy}" in banner and "b0/m1" in banner and "b1/m1" in banner
        assert "fast lane: " in banner  # (which one, and why)
        r = httpx.post(envoy + "/v1/chat/completions", timeout=30,
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["x-extproc-backend"] == "b0"
        assert (tmp_path / "run" / "envoy.yaml").exists()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        assert _children(config) == []  # the service is gone
        try:
            httpx.get(envoy + "/v1/models", timeout=2)
            raise AssertionError("Envoy still answers after Ctrl-C")
        except httpx.TransportError:
            pass

        # A child that dies is reported with the end of its log, and the rest is stopped.
        proc, _ = _up(config, tmp_path / "run2")
        (service,) = _children(config)
        os.kill(service, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1
        assert "service exited with -9" in out and "the end of" in out

        # Its reader gone (`extproc up | head`), Ctrl-C still stops everything.
        proc, _ = _up(config, tmp_path / "run3")
        proc.stdout.close()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        assert _children(config) == []
        try:
            httpx.get(envoy + "/v1/models", timeout=2)
            raise AssertionError("Envoy still answers after Ctrl-C")
        except httpx.TransportError:
            pass
    finally:
        for b in backends:
            b.terminate()
            b.wait(10)


def test_up_reports_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"backends": [{"name": "x", "url": "http://127.0.0.1:1/v1",
                                                    "discovery": {"enabled": False}}]}))
    done = subprocess.run([sys.executable, "-m", "extproc.cli", "up", "--config", str(config),
                           "--workdir", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "backends[0].models" in done.stderr
