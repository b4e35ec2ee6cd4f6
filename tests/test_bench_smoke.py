"""A few-second run of the reference benchmark: it runs and prints its table (not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_prints_a_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "chat 1KB c=1" in r.stdout and "ratios: c/a p50" in r.stdout
    data = json.loads(out.read_text())
    row = data["cases"][0]
    for target in ("a bare Envoy", "b empty ext_proc", "c llm-extproc"):
        assert row[target]["rps"] > 0 and row[target]["non_2xx"] == 0
