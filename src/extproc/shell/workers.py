"""`extproc serve --workers N`: N service processes, worker i on port + i.

One Python process uses one core, and the per-stream gRPC work dominates, so throughput scales
with processes. Envoy balances streams across the N sockets (the rendered service cluster lists
them); the service is stateless across streams (the candidate list travels in Envoy metadata), so
the two stages of one request may land on different workers. The supervisor forwards SIGTERM,
SIGINT and SIGHUP, restarts a worker that dies, and serves the workers' metrics summed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from .. import metrics
from ..config import Config
from ..logs import log_event

log = logging.getLogger("extproc.shell.workers")


def supervise(config_path: str, cfg: Config, n: int, lane: str | None = None) -> int:
    if cfg.service.metrics_port:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR",
                              tempfile.mkdtemp(prefix="extproc-metrics-"))
        metrics.start_multiprocess(cfg.service.metrics_port, cfg.service.host)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--config",
                                 config_path, "--port", str(cfg.service.port + i),
                                 "--worker", str(i), *(["--lane", lane] if lane else [])])

    procs = {i: spawn(i) for i in range(n)}
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log_event(log, {"event": "workers.started", "workers": n,
                    "ports": [cfg.service.port + i for i in range(n)]})
    while True:
        time.sleep(0.2)
        if stopping:
            break
        for i, p in list(procs.items()):
            if p.poll() is not None:
                log_event(log, {"event": "worker.restarted", "worker": i,
                                "exit_code": p.returncode}, logging.WARNING)
                procs[i] = spawn(i)
    deadline = time.monotonic() + cfg.service.shutdown_grace_s + 5
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return 0
