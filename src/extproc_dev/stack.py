"""Local stack without Docker: backend emulators + the service + a real Envoy, as processes.

Used by `make run` (foreground), `make demo`, the end-to-end tests and the benchmark. The
service and Envoy are started by ``extproc.launcher`` (what ``extproc up`` runs); this adds the
emulators. Every process binds to loopback and is always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

from extproc.config import backend_endpoint
from extproc.launcher import Launcher, envoy_binary, run_foreground, wait_port

__all__ = ["Stack", "envoy_binary", "free_port", "free_port_run", "wait_port"]

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


class Stack(Launcher):
    """Emulators for each backend (unless ``emulate`` is off), then the service and Envoy, for
    one config file."""

    def __init__(self, config_path: str | os.PathLike[str], workdir: str | None = None,
                 emulate: bool = True, log_dir: str | None = None,
                 env: dict[str, str] | None = None, dead_backends: tuple[str, ...] = (),
                 tls: tuple[str, str] | None = None, envoy_workers: int = 1):
        super().__init__(config_path, workdir or tempfile.mkdtemp(prefix="extproc-stack-"),
                         log_dir, env, envoy_workers)
        self.emulate = emulate
        self.dead_backends = set(dead_backends)  # not started (dead, or real servers)
        self.tls = tls  # (cert, key) for emulators of https backends

    def backend_url(self, name: str) -> str:
        b = next(b for b in self.config.backends if b.name == name)
        ep = backend_endpoint(b.url)
        return f"{ep.scheme}://{ep.hostname if ep.scheme == 'https' else ep.host}:{ep.port}"

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
        self.start_gateway()
        for name, proc in self.procs.items():
            if name.startswith("emulator-"):
                b = next(b for b in cfg.backends if f"emulator-{b.name}" == name)
                ep = backend_endpoint(b.url)
                wait_port(ep.host, ep.port, timeout=90, proc=proc)  # OCR warm-up on cold disks


def usage_text(stack: Launcher) -> str:
    url = stack.envoy_url
    names = sorted({m.name for m in stack.config.models} | {
        a for m in stack.config.models for a in m.aliases})
    model = names[0] if names else "MODEL"
    return f"""
llm-extproc stack is up. Envoy listens on {url}
  models: {', '.join(names)}
  logs:   {stack.log_dir}
  {stack.lane}

  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}' -i

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='x'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role':'user','content':'hi'}}]))"

Ctrl-C stops everything.
"""


def run_foreground_stack(config_path: str) -> int:
    log_dir = Path(".run")
    log_dir.mkdir(exist_ok=True)
    stack = Stack(config_path, workdir=str(log_dir), log_dir=str(log_dir))
    return run_foreground(stack, usage_text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="emulators + service + Envoy in the foreground "
                                 "(make run); Ctrl-C stops all")
    ap.add_argument("--config", default="config/demo.yaml")
    return run_foreground_stack(ap.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
