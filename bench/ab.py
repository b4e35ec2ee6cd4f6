"""Before/after for a hot-path change: this checkout against another git revision, each with its
own service and Envoy (rendered by its own code), on one emulated backend, interleaved round by
round. This VM's run-to-run spread is +-10%, so only side-by-side rounds tell a few percent
apart: compare the "after/before" ratios of the same round, and the CPU per request (steadier
than req/s).

    python bench/ab.py [--against HEAD~1] [--body chat_1k] [--conc 1,8] [--rounds 4]
                       [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

from bench import (
    CLIENT_KEY,
    Procs,
    cpu_seconds,
    extproc_config,
    lua_script,
    make_bodies,
    path_for,
    run_wrk,
    wait_idle,
)
from extproc_dev.stack import envoy_binary, free_port

ROOT = Path(__file__).resolve().parent.parent
# The emulators a body needs besides the vLLM one (bench.py's configuration).
NEEDS = {"audio_4m": ("llama",), "vision_hit": ("llama", "aux"), "messages": ("chat",)}


def start_side(procs: Procs, tmp: Path, name: str, src: Path, ports: dict[str, int]) -> str:
    """One service + Envoy from the code under ``src``; returns Envoy's URL."""
    cfg = extproc_config(ports["emu"], ports["llama"], ports["aux"], chat_port=ports.get("chat"))
    cfg["service"].pop("unix_socket")  # (TCP both sides: older revisions have no socket)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": str(src)}
    envoy_yaml = tmp / f"{name}-envoy.yaml"
    subprocess.run([sys.executable, "-m", "extproc.cli", "envoy", "--config", str(path), "--out",
                    str(envoy_yaml)], env={**os.environ, **env}, check=True)
    procs.start(f"service-{name}", [sys.executable, "-m", "extproc.cli", "serve", "--config",
                                    str(path)], cfg["service"]["port"], env=env)
    listen = cfg["envoy"]["listen_port"]
    procs.start(f"envoy-{name}", [envoy_binary(), "-c", str(envoy_yaml), "--concurrency", "1",
                                  "--log-level", "error", "--base-id", str(free_port())], listen)
    return f"http://127.0.0.1:{listen}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD~1", help="the 'before' git revision")
    ap.add_argument("--body", default="chat_1k",
                    choices=["chat_1k", "chat_fast", "image_1m", "audio_4m", "vision_hit",
                             "messages"])
    ap.add_argument("--conc", default="1,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="extproc-ab-"))
    before = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                    args.against], check=True, capture_output=True)
    procs = Procs(tmp)
    try:
        ports = {"emu": free_port(), "llama": free_port(), "aux": free_port(),
                 **({"chat": free_port()} if "chat" in NEEDS.get(args.body, ()) else {})}
        emulators = [("emu", "vllm", "bench-model-awq,bench-model,plain-model"),
                     ("llama", "llamacpp", "audio-gguf,text-gguf"), ("aux", "ocr", "ocr"),
                     ("chat", "openai", "bench-messages")]
        for name, flavour, models in emulators:
            if name == "emu" or name in NEEDS.get(args.body, ()):
                procs.start(name, [sys.executable, "-m", "extproc_dev.emulators", "--flavour",
                                   flavour, "--name", name, "--models", models, "--port",
                                   str(ports[name]), "--no-record-bodies"], ports[name],
                            timeout=120)
        sides = {"before": start_side(procs, tmp, "before", before / "src", ports),
                 "after": start_side(procs, tmp, "after", ROOT / "src", ports)}
        body = make_bodies(tmp)[args.body]
        path = path_for(args.body, "c")  # (Messages: translated for a chat-only backend)
        script = lua_script(tmp, body, ports["emu"])
        for url in sides.values():  # warm caches (the aux-vision one above all)
            httpx.post(url + path, content=body.read_bytes(), timeout=60,
                       headers={"content-type": "application/json",
                                "authorization": f"Bearer {CLIENT_KEY}"})
        print(f"before = {args.against}, after = this checkout; body {args.body}; "
              f"{args.rounds} rounds of {args.duration:.0f} s each, interleaved")
        for conc in (int(c) for c in args.conc.split(",")):
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for url in sides.values():
                run_wrk(url, script, conc, 1, path)
            for _ in range(args.rounds):
                for side, url in sides.items():
                    pids = [procs.procs[f"service-{side}"].pid, procs.procs[f"envoy-{side}"].pid]
                    wait_idle()
                    cpu0 = [cpu_seconds([p]) for p in pids]
                    r = run_wrk(url, script, conc, args.duration, path)
                    n = max(1, r["requests"])
                    r["service_ms"], r["envoy_ms"] = (
                        (cpu_seconds([p]) - c) * 1000 / n for p, c in zip(pids, cpu0, strict=True))
                    runs[side].append(r)
            print(f"concurrency {conc}")
            for side, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs)
                       for k in ("p50_ms", "p99_ms", "rps", "service_ms", "envoy_ms")}
                errors = sum(r["non_2xx"] for r in rs)
                print(f"  {side:7} p50 {med['p50_ms']:6.2f} ms  p99 {med['p99_ms']:6.2f} ms  "
                      f"{med['rps']:7.0f} req/s  CPU per "
                      f"request: service {med['service_ms']:.3f} ms, Envoy {med['envoy_ms']:.3f} "
                      f"ms  rounds {[round(r['rps']) for r in rs]}"
                      + (f"  NON-2XX {errors}" if errors else ""))
            pairs = list(zip(runs["before"], runs["after"], strict=True))
            rps = sorted(a["rps"] / b["rps"] for b, a in pairs)
            p50 = sorted(a["p50_ms"] / b["p50_ms"] for b, a in pairs)
            p99 = sorted(a["p99_ms"] / b["p99_ms"] for b, a in pairs)
            print(f"  after/before by round: req/s {[round(x, 2) for x in rps]} (median "
                  f"{statistics.median(rps):.3f}), p50 {[round(x, 2) for x in p50]} (median "
                  f"{statistics.median(p50):.3f}), p99 {[round(x, 2) for x in p99]} (median "
                  f"{statistics.median(p99):.3f})")
    finally:
        procs.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                       capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
