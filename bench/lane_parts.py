"""What each part of the fast lane costs, against bare Envoy: the rendered config with parts
taken out, side by side, interleaved round by round, on one emulated backend (1 KB chat for a
lane model): where the lane's cost is, and what the compiled lane leaves of it.

    bare            Envoy alone (bench.py's target a)
    routing         the lane's routing with no decision at all: json_to_metadata's rules set
                    the metadata the Lua would (one model: a bound, not a lane), no response
                    Lua, no decision log
    + record        routing + the decision log (Envoy's gRPC access log to the service, which
                    writes each request's record and metrics)
    + answers       routing + the response Lua (whole answers held, token usage read)
    + both          routing + record + answers: a lane whose decision costs nothing
    lane            the lane as rendered (the deciding Lua too)
    lane compiled   the lane as rendered with envoy.fast_lane_compiled: lane/lane.c, an Envoy
                    dynamic module, in place of the two request filters, the response Lua and
                    the access log entry (its records come to the service over a Unix socket:
                    their count is checked against the requests answered)

    python bench/lane_parts.py [--conc 8] [--rounds 5] [--duration 4] [--envoy-workers 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import (
    CLIENT_KEY,
    Procs,
    cpu_seconds,
    extproc_config,
    lua_script,
    make_bodies,
    plain_envoy,
    run_wrk,
    wait_idle,
)
from extproc.contract import META_NS, Meta
from extproc.lane.build import SEARCH_PATH, build
from extproc.render.fast_lane import DECIDE_FILTER, READ_FILTER
from extproc_dev.stack import envoy_binary, free_port

Config = dict[str, Any]


def _hcms(env: Config) -> list[Config]:
    return [f["typed_config"] for listener in env["static_resources"]["listeners"]
            for chain in listener["filter_chains"] for f in chain["filters"]
            if "http_filters" in f["typed_config"]]


def _rule(key: Meta, value: str | None = None) -> Config:
    """A json_to_metadata rule: when the body has a model, ``key`` set to ``value`` (the model
    itself when None)."""
    pair: Config = {"metadata_namespace": META_NS, "key": key.value}
    if value is not None:
        pair["value"] = value
    return {"selectors": [{"key": "model"}], "on_present": pair}


def _without_record(hcm: Config) -> None:
    """No decision log: the gRPC access log back to the service taken out."""
    hcm["access_log"] = [a for a in hcm.get("access_log", [])
                         if a["name"] != "envoy.access_loggers.http_grpc"]


def _without(env: Config, *, record: bool, answers: bool, host: str, backend: str) -> Config:
    """The lane minus its deciding Lua (json_to_metadata sets its metadata, for one model),
    minus the response Lua and the decision log unless kept."""
    for hcm in _hcms(env):
        kept = []
        for f in hcm["http_filters"]:
            if f["name"] == DECIDE_FILTER or (f["name"] == "extproc.responses" and not answers):
                continue
            if f["name"] == READ_FILTER:
                f["typed_config"]["request_rules"]["rules"] += [
                    _rule(Meta.FAST, "0"), _rule(Meta.HOSTS, host),
                    _rule(Meta.BACKEND, backend), _rule(Meta.PUBLIC_MODEL), _rule(Meta.MODEL)]
            kept.append(f)
        hcm["http_filters"] = kept
        if not record:
            _without_record(hcm)
    return env


def variants(host: str) -> dict[str, Callable[[Config], Config] | None]:
    """Each variant's change to the rendered config (None: bare Envoy); ``COMPILED`` says
    which variants are rendered with the compiled lane."""
    def part(record: bool, answers: bool) -> Callable[[Config], Config]:
        return lambda env: _without(env, record=record, answers=answers, host=host,
                                    backend="emu")

    return {"bare": None, "routing": part(False, False), "+ record": part(True, False),
            "+ answers": part(False, True), "+ both": part(True, True),
            "lane": lambda env: env, "lane compiled": lambda env: env}


COMPILED = ("lane compiled",)


def recorded(metrics_port: int) -> float:
    """Requests the service has a record of (its request counter)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llm_extproc_requests_total"))


def route_stage_requests(metrics_port: int) -> float:
    """How many requests the service's route stage was asked about (0 on the lane)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llm_extproc_processing_seconds_count")
               and 'phase="request_headers"' in line and 'stage="route"' in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conc", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--envoy-workers", type=int, default=1, help="each Envoy's --concurrency")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="extproc-lane-parts-"))
    procs = Procs(tmp)
    try:
        emu = free_port()
        procs.start("emu", [sys.executable, "-m", "extproc_dev.emulators", "--flavour", "vllm",
                            "--name", "emu", "--models", "bench-model-awq,bench-model",
                            "--port", str(emu), "--no-record-bodies"], emu, timeout=120)
        module = {SEARCH_PATH: str(build())}
        urls, pids, metrics = {}, {}, {}
        for n, (name, change) in enumerate(variants(f"127.0.0.1:{emu}").items()):
            cfg = extproc_config(emu, free_port(), free_port())
            cfg["envoy"]["fast_lane_compiled"] = name in COMPILED
            listen = cfg["envoy"]["listen_port"]
            cfg_path, envoy_path = tmp / f"{n}.yaml", tmp / f"{n}-envoy.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            if change is None:
                env = plain_envoy(listen, free_port(), emu, None)
            else:
                subprocess.run([sys.executable, "-m", "extproc.cli", "envoy", "--config",
                                str(cfg_path), "--out", str(envoy_path)], check=True)
                env = change(yaml.safe_load(envoy_path.read_text()))
                procs.start(f"service-{n}", [sys.executable, "-m", "extproc.cli", "serve",
                                             "--config", str(cfg_path)], cfg["service"]["port"])
                metrics[name] = cfg["service"]["metrics_port"]
            envoy_path.write_text(yaml.safe_dump(env))
            procs.start(f"envoy-{n}", [envoy_binary(), "-c", str(envoy_path), "--concurrency",
                                       str(args.envoy_workers), "--log-level", "error", "--base-id",
                                       str(free_port())], listen,
                        env=module)
            urls[name] = f"http://127.0.0.1:{listen}"
            pids[name] = [procs.procs[f"envoy-{n}"].pid] + (
                [procs.procs[f"service-{n}"].pid] if change is not None else [])
        body = make_bodies(tmp)["chat_fast"]
        script = lua_script(tmp, body, emu)
        warm = {}
        for name, url in urls.items():
            r = httpx.post(url + "/v1/chat/completions", content=body.read_bytes(), timeout=30,
                           headers={"content-type": "application/json",
                                    "authorization": f"Bearer {CLIENT_KEY}"})
            r.raise_for_status()
            warm[name] = 1 + run_wrk(url, script, args.conc, 1)["requests"]
        # every variant but bare serves the request by the lane: the route stage never asked
        off = [name for name, port in metrics.items() if route_stage_requests(port)]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                wait_idle()
                cpu0 = [cpu_seconds([p]) for p in pids[name]]
                r = run_wrk(url, script, args.conc, args.duration)
                n = max(1, r["requests"])
                cpu = [(cpu_seconds([p]) - c) * 1000 / n for p, c in zip(pids[name], cpu0,
                                                                        strict=True)]
                runs[name].append({**r, "envoy_ms": cpu[0], "service_ms": sum(cpu[1:])})
        print(f"1 KB chat for a lane model, concurrency {args.conc}, {args.rounds} interleaved "
              f"rounds of {args.duration:.0f} s; Envoy --concurrency {args.envoy_workers}")
        print(f"  {'variant':14} {'req/s':>7} {'/bare':>6} {'p50 ms':>7}  CPU ms per request: "
              "Envoy, service")
        for name, rs in runs.items():
            paired = statistics.median(r["rps"] / b["rps"] for r, b in zip(rs, runs["bare"],
                                                                          strict=True))
            med = {k: statistics.median(r[k] for r in rs)
                   for k in ("rps", "p50_ms", "envoy_ms", "service_ms")}
            errors = sum(r["non_2xx"] for r in rs)
            print(f"  {name:14} {med['rps']:7.0f} {paired:6.2f} {med['p50_ms']:7.2f}  "
                  f"{med['envoy_ms']:.3f}, {med['service_ms']:.3f}"
                  + (f"  NON-2XX {errors}" if errors else "")
                  + ("  OFF THE LANE (the route stage was asked)" if name in off else ""))
        for name in COMPILED:
            sent = warm[name] + sum(r["requests"] for r in runs[name])
            time.sleep(0.5)  # (the module's last batch: sent within 20 ms)
            print(f"{name}: records received {recorded(metrics[name]):.0f} for {sent} requests "
                  "wrk saw answered (more: wrk does not count what was in flight when it "
                  "stopped)")
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
