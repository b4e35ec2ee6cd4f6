"""A smoke run of the benchmark's Envoy AI Gateway target (``bench/bench.py --targets e``): aigw
installed into its cached venv on first use (~30 s), started in front of the same emulator as
an llm-extproc stack (both Envoys with 2 workers), and the same requests through both. The
figures are printed, not judged (measuring is ``make bench``'s job); what must hold is that the
target starts and both answer every request. If aigw cannot be installed or started, this
fails with the reason."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from extproc_dev.stack import Stack, free_port

from .conftest import REPORT, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench

N = 150  # requests per case and target, one at a time over a kept-alive connection


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("peer")
    procs = bench.Procs(tmp)
    emu_port = free_port()
    stack = None
    try:
        procs.start("emulator", [sys.executable, "-m", "extproc_dev.emulators", "--flavour",
                                 "vllm", "--name", "emu", "--models",
                                 "bench-model-awq,bench-model,plain-model", "--port",
                                 str(emu_port), "--no-record-bodies"], emu_port)
        cfg = bench.extproc_config(emu_port, free_port(), free_port())
        (tmp / "extproc.yaml").write_text(yaml.safe_dump(cfg))
        (tmp / "stack").mkdir()
        stack = Stack(tmp / "extproc.yaml", workdir=str(tmp / "stack"), emulate=False,
                      envoy_workers=2)
        stack.start()
        aigw = timed("aigw (install on first use, start)",
                     lambda: bench.start_aigw(procs, tmp, bench.aigw_config(emu_port)))
        assert aigw, f"Envoy AI Gateway did not start: see {tmp}/aigw.log"
        yield {"llm-extproc": stack.envoy_url, "Envoy AI Gateway": aigw}
    finally:
        if stack is not None:
            stack.stop()
        procs.stop()


def figures(url: str, body: bytes) -> tuple[float, float, list[int]]:
    """req/s and p50 ms of N requests one at a time, and every status."""
    times, statuses = [], []
    with httpx.Client(timeout=30) as c:
        for i in range(N + 10):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json",
                                "authorization": f"Bearer {bench.CLIENT_KEY}"})
            if i >= 10:  # (the first few warm the connection up)
                times.append(time.perf_counter() - t0)
                statuses.append(r.status_code)
    return len(times) / sum(times), statistics.median(times) * 1000, statuses


@pytest.mark.parametrize("case,extra", [
    ("chat 1KB with a response_format (ext_proc path)", {"response_format": {"type": "text"}}),
    ("chat 1KB, renamed (our fast lane)", {})])
def test_the_aigw_target_runs_beside_ours(side_by_side: dict[str, str], case: str,
                                          extra: dict) -> None:
    body = orjson.dumps({"model": "bench-model", "max_tokens": 64, **extra, "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 8},
        {"role": "user", "content": "Explain the difference between TCP and UDP. " * 14}]})
    out = {}
    for name, url in side_by_side.items():
        rps, p50, statuses = figures(url, body)
        assert set(statuses) == {200}, f"{name}: {sorted(set(statuses))}"
        out[name] = (rps, p50)
    ours, peer = out["llm-extproc"], out["Envoy AI Gateway"]
    REPORT.peer[case] = (f"llm-extproc {ours[0]:.0f} req/s, p50 {ours[1]:.2f} ms; Envoy AI "
                         f"Gateway {peer[0]:.0f} req/s, p50 {peer[1]:.2f} ms; ratio "
                         f"{ours[0] / peer[0]:.2f}x (concurrency 1)")
