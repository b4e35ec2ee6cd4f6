"""Reference benchmark: bare Envoy vs Envoy + llm-extproc, side by side, same emulated backend.

Runs the cases interleaved (A, B, A, B, ...) so drift on a shared machine hits both, prints a
table with p50/p99/req/s and the ratio to bare Envoy, and writes bench/results/latest.json.
Needs `wrk` (Debian package `wrk`; `make bench` installs it when missing).

    python bench/bench.py [--duration 5] [--repeat 2] [--smoke]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import soundfile
import yaml

from extproc.devstack import Stack, envoy_binary, free_port, wait_port

HERE = Path(__file__).resolve().parent


def bench_config(backend_port: int, llama_port: int) -> dict:
    return {
        "service": {"port": free_port(), "log_level": "warning", "metrics_port": free_port()},
        "envoy": {"listen_port": free_port(), "admin_port": free_port(), "access_log": False},
        "backends": [
            {"name": "emu", "preset": "vllm", "url": f"http://127.0.0.1:{backend_port}/v1",
             # bare Envoy sends the public names unchanged, so the emulator serves them too
             "models": [{"name": "bench-model-awq"}, {"name": "bench-model"},
                        {"name": "bench-audio"}]},
            {"name": "emu-llama", "preset": "llamacpp", "url": f"http://127.0.0.1:{llama_port}/v1",
             "models": [{"name": "audio-gguf"}]}],
        "models": [
            {"name": "bench-model", "candidates": [{"backend": "emu", "model": "bench-model-awq"}]},
            # audio_url is not taken by llama.cpp: converted to input_audio on every request
            {"name": "bench-audio", "candidates": [{"backend": "emu-llama", "model": "audio-gguf"}]}],
    }


def bare_envoy_config(listen: int, admin: int, backend_port: int, limit: int) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "bare", "per_connection_buffer_limit_bytes": limit,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                        "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "bare",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                         "routes": [{"match": {"prefix": "/"},
                                                     "route": {"cluster": "emu"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                            "router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": [{
                "name": "emu", "type": "STATIC", "connect_timeout": "1s",
                "per_connection_buffer_limit_bytes": limit,
                "load_assignment": {"cluster_name": "emu", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": backend_port}}}}]}]},
            }],
        },
    }


def make_bodies(tmp: Path) -> dict[str, Path]:
    chat = {"model": "bench-model", "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 8},
        {"role": "user", "content": "Explain the difference between TCP and UDP. " * 14}]}
    img = base64.b64encode(os.urandom(3_000_000)).decode()
    big = {"model": "bench-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}]}]}
    rng = np.random.default_rng(1)
    wav = io.BytesIO()
    soundfile.write(wav, rng.uniform(-0.3, 0.3, 1_500_000).astype("float32"), 16000,
                    format="WAV", subtype="PCM_16")
    audio_b64 = base64.b64encode(wav.getvalue()).decode()
    audio = {"model": "bench-audio", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Transcribe this."},
        {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{audio_b64}"}}]}]}
    out = {}
    for name, body in (("chat_1k", chat), ("image_4m", big), ("audio_4m", audio)):
        p = tmp / f"{name}.json"
        p.write_bytes(orjson.dumps(body))
        out[name] = p
    return out


def lua_script(tmp: Path, body: Path) -> Path:
    p = tmp / f"{body.stem}.lua"
    p.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["content-type"] = "application/json"\n'
        f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    return p


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(url: str, script: Path, conc: int, duration: float) -> dict:
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(conc), "-d", f"{max(1, round(duration))}s", "--latency",
         "-s", str(script), url + "/v1/chat/completions"],
        capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout
    if "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    pct = {}
    for p, val, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        pct[p] = float(val) * _UNITS[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "rps": rps,
            "non_2xx": int(errors.group(1)) if errors else 0}


def ttfb(url: str, body: bytes, n: int) -> dict:
    """Time to the first body byte of a streamed answer, over ``n`` sequential requests."""
    import httpx

    times = []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            with c.stream("POST", url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}) as r:
                chunks = r.iter_raw()
                for chunk in chunks:
                    if chunk:
                        times.append((time.perf_counter() - t0) * 1000)
                        break
                for _ in chunks:  # drain the rest of the stream
                    pass
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(len(times) * 0.99) - 1],
            "n": n}


def stream_cases(bare: str, extproc: str, emulator: str, n: int) -> dict:
    """Forced-tools streaming: TTFB through bare Envoy, the hold, and pass-through (auto)."""
    import httpx

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "bench-model", "stream": True, "tools": tools,
            "messages": [{"role": "user", "content": "call f"}]}
    forced = orjson.dumps({**body, "tool_choice": "required"})
    auto = orjson.dumps({**body, "tool_choice": "auto"})
    delay = 0.02  # between SSE events: the deciding tool_calls delta is the second event
    httpx.post(emulator + "/_emulator/behaviour", json={"stream_delay_s": delay})
    try:
        out = {"event_gap_ms": delay * 1000,
               "bare Envoy (forced)": ttfb(bare, forced, n),
               "extproc pass-through (auto)": ttfb(extproc, auto, n),
               "extproc hold (forced)": ttfb(extproc, forced, n)}
    finally:
        httpx.post(emulator + "/_emulator/behaviour", json={})
    return out


def wait_idle(max_wait: float = 10.0, threshold: float = 0.6) -> None:
    """Wait until the 1-minute-ish load settles (cheap proxy: /proc/loadavg 1-min < threshold x cores)."""
    deadline = time.monotonic() + max_wait
    cores = os.cpu_count() or 1
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as f:
            if float(f.read().split()[0]) < threshold * cores:
                return
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="1s per case, one repeat (for tests)")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.repeat = 1.0, 1
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    backend_port = free_port()
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(bench_config(backend_port, free_port())))
    bodies = make_bodies(tmp)
    scripts = {k: lua_script(tmp, v) for k, v in bodies.items()}
    bare_port, bare_admin = free_port(), free_port()
    (tmp / "bare.yaml").write_text(yaml.safe_dump(
        bare_envoy_config(bare_port, bare_admin, backend_port, 32 * 1024 * 1024)))
    cases = [("chat 1KB", "chat_1k", 1), ("chat 1KB", "chat_1k", 8), ("image 4MB", "image_4m", 4),
             ("audio_url 4MB", "audio_4m", 4)]
    results: dict[str, dict[str, list[dict]]] = {}
    stack = Stack(cfg_path, workdir=str(tmp), env={"EMULATOR_NO_RECORD_BODIES": "1"})
    bare = None
    try:
        stack.start()
        bare = subprocess.Popen([envoy_binary(), "-c", str(tmp / "bare.yaml"), "--concurrency",
                                 "1", "--log-level", "warn", "--base-id", str(os.getpid() % 9000 + 1)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", bare_port, proc=bare)
        targets = {"bare Envoy": f"http://127.0.0.1:{bare_port}", "Envoy + extproc": stack.envoy_url}
        for name, body, conc in cases:
            key = f"{name} c={conc}"
            results[key] = {t: [] for t in targets}
            for url in targets.values():  # warm-up
                run_wrk(url, scripts[body], conc, 1)
            for _ in range(args.repeat):
                for t, url in targets.items():
                    wait_idle()
                    results[key][t].append(run_wrk(url, scripts[body], conc, args.duration))
        wait_idle()
        streaming = stream_cases(targets["bare Envoy"], stack.envoy_url,
                                 stack.backend_url("emu"), 20 if args.smoke else 100)
    finally:
        stack.stop()
        if bare is not None:
            bare.terminate()
            bare.wait(timeout=10)
    summary = []
    for key, per in results.items():
        row = {"case": key}
        for t, runs in per.items():
            row[t] = {m: statistics.median(r[m] for r in runs) for m in ("p50_ms", "p99_ms", "rps")}
            row[t]["spread_rps"] = [round(r["rps"]) for r in runs]
            row[t]["non_2xx"] = sum(r["non_2xx"] for r in runs)
        b, x = row["bare Envoy"], row["Envoy + extproc"]
        row["p50_ratio"] = x["p50_ms"] / b["p50_ms"]
        row["rps_ratio"] = x["rps"] / b["rps"]
        summary.append(row)
    machine = f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}, " \
              f"{time.strftime('%Y-%m-%d')}"
    print(f"\nmachine: {machine}; {args.duration}s x {args.repeat} per target, interleaved\n")
    hdr = (f"{'case':18} {'target':16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
           f"{'runs req/s':>16} {'non2xx':>6}")
    print(hdr)
    print("-" * len(hdr))
    for row in summary:
        for t in ("bare Envoy", "Envoy + extproc"):
            v = row[t]
            print(f"{row['case']:18} {t:16} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} {v['rps']:8.0f} "
                  f"{v['spread_rps']!s:>16} {v['non_2xx']:6d}")
        print(f"{'':18} {'ratio':16} {row['p50_ratio']:7.1f}x {'':8} {row['rps_ratio']:7.2f}x")
    print(f"\nforced-tools streaming, time to first byte (SSE events every "
          f"{streaming['event_gap_ms']:.0f} ms; the deciding tool_calls delta is event 2):")
    for name, v in streaming.items():
        if isinstance(v, dict):
            print(f"  {name:30} p50 {v['p50_ms']:7.2f} ms   p99 {v['p99_ms']:7.2f} ms   n={v['n']}")
    hold = streaming["extproc hold (forced)"]["p50_ms"]
    passthrough = streaming["extproc pass-through (auto)"]["p50_ms"]
    print(f"  hold cost vs pass-through: {hold - passthrough:+.2f} ms p50")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "cases": summary,
                                          "streaming_ttfb": streaming}, indent=2))
    print(f"\nwritten: {args.out}")
    bad = sum(row[t]["non_2xx"] for row in summary for t in ("bare Envoy", "Envoy + extproc"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
