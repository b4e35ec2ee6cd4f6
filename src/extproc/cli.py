"""Command line: check a config, render Envoy's config, serve, run Envoy and the service
together (up), show the models, write a starter config, replay fixtures."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _load(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(2)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from .core.routing import RoutingTable

    table = RoutingTable(cfg)
    from .core.fast_lane import describe

    print(f"{args.config}: ok: {len(cfg.backends)} backend(s), "
          f"{len(table.entries)} public model(s), {len(table.aliases)} alias(es)")
    for line in describe(cfg):
        print(f"  {line}")
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    from .render import render_snippets, render_yaml

    cfg = _load(args.config)
    text = render_snippets(cfg) + "\n" if args.snippets else \
        render_yaml(cfg, Path(args.config).name)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .core.backends import MissingCredential
    from .core.fast_lane import record_socket
    from .lane.build import settled
    from .logs import setup_logging
    from .render.fast_lane import compiled
    from .runtime import Runtime
    from .shell.server import serve, tune_allocator

    cfg = _load(args.config)
    lane = None if args.lane is None else args.lane == "compiled"
    if lane is not None:  # (what the Envoy in front runs, as `extproc up` settled it)
        cfg = settled(cfg, lane)
    setup_logging(cfg.service.log_level)
    try:
        rt = Runtime.build(cfg)
    except (MissingCredential, ConfigError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or cfg.service.workers
    if workers > 1 and args.worker is None:
        from .shell.workers import supervise

        return supervise(args.config, cfg, workers, args.lane)
    metrics_port = 0 if args.worker is not None else None  # the supervisor serves them
    asyncio.run(serve(rt, args.host, args.port, config_path=args.config,
                      metrics_port=metrics_port, trim=tune_allocator(),
                      unix_socket=cfg.service.socket_path(args.worker or 0),
                      lane_socket=record_socket(cfg, args.worker or 0)
                      if compiled(cfg) else None,
                      lane=lane))
    return 0


def cmd_lane_module(args: argparse.Namespace) -> int:
    """Builds the compiled fast lane (if not built yet) and prints where Envoy finds it."""
    from .lane.build import LaneBuildError, build

    try:
        print(build())
    except LaneBuildError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """gRPC health check (container HEALTHCHECK, scripts): exit 0 only when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_models(args: argparse.Namespace) -> int:
    """Each public model and where it goes: what ``GET /v1/models`` says, after asking the
    backends once (discovery and health), as a table."""
    import time

    from .core.backends import MissingCredential
    from .runtime import Runtime
    from .shell.server import survey

    cfg = _load(args.config)
    try:
        rt = asyncio.run(survey(Runtime.build(cfg)))
    except (MissingCredential, ConfigError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    rows = [("model", "backend", "served as", "capabilities", "context", "health")]
    for item in rt.table.models_list(rt.health, time.monotonic())["data"]:
        for c in item.get("candidates", ()):
            caps = f"{','.join(c['capabilities']) or '-'} ({c['capabilities_from']})"
            rows.append((item["id"], c["backend"], c["model"], caps,
                         str(c.get("context_length", "-")), c.get("health", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .starter import starter_config

    text = asyncio.run(starter_config(args.backend, args.timeout))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; check it with `extproc check {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .config_reference import json_schema, reference

    sys.stdout.write(reference() if args.reference else json_schema())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Envoy and the service against the config's own backends, in the foreground."""
    from .launcher import Launcher, run_foreground

    _load(args.config)  # problems are reported (exit 2) before anything starts
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return run_foreground(Launcher(args.config, workdir=str(workdir), log_dir=str(workdir)))


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import run

    return run(args.fixtures, args.envoy, args.config, args.record, args.timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="validate a config; every error with its key path")
    p.add_argument("config")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("envoy", help="render the Envoy bootstrap for a config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--snippets", action="store_true",
                   help="only the pieces to paste into an existing Envoy (Markdown)")
    p.set_defaults(func=cmd_envoy)
    p = sub.add_parser("serve", help="run the ext_proc gRPC service")
    p.add_argument("--config", required=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="processes (default: service.workers); worker i "
                   "listens on port + i, which the rendered Envoy config balances across")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lane", choices=("compiled", "lua"), help="the fast lane the Envoy in "
                   "front runs, settling envoy.fast_lane_compiled: auto (compiled: receive its "
                   "records on the Unix socket; `extproc up` passes it)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("lane-module", help="build the compiled fast lane "
                       "(envoy.fast_lane_compiled) and print the directory to give your Envoy "
                       "as ENVOY_DYNAMIC_MODULES_SEARCH_PATH")
    p.set_defaults(func=cmd_lane_module)
    p = sub.add_parser("health", help="check a running service's gRPC health")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--service", default="envoy.service.ext_proc.v3.ExternalProcessor")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
    p = sub.add_parser("models", help="each public model, where it goes, what it can do "
                       "(asking the backends once)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("init", help="write a starter config from live backends")
    p.add_argument("--backend", action="append", required=True, metavar="URL",
                   help="a backend's URL (repeat for several)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("schema", help="the config's JSON Schema (for editors), or with "
                       "--reference the configuration reference (Markdown)")
    p.add_argument("--reference", action="store_true")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("up", help="run Envoy and the service against the config's backends "
                       "(foreground; Ctrl-C stops both)")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", default=".run", help="where Envoy's rendered config and the "
                   "logs go (default: .run)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("replay", help="send request fixtures through Envoy and check them")
    p.add_argument("fixtures", nargs="+", help="fixture files or directories")
    p.add_argument("--envoy", required=True, help="Envoy's URL, e.g. http://127.0.0.1:10000")
    p.add_argument("--config", help="the service config: lets replay read what emulated "
                   "backends received")
    p.add_argument("--record", metavar="DIR", help="write fixtures with what happened")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_replay)
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
