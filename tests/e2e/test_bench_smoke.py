"""A few-second run of the reference benchmark: it runs and prints its table (not timed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def test_ab_runs_both_revisions_side_by_side() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), "--against", "HEAD",
                        "--rounds", "1", "--duration", "1", "--conc", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sides = [line.split() for line in r.stdout.splitlines()
             if line.strip().startswith(("before ", "after ")) and "req/s" in line]
    assert [s[0] for s in sides] == ["before", "after"]
    assert all(float(s[s.index("req/s") - 1]) > 0 and "NON-2XX" not in s
               for s in sides)  # req/s, no errors
    assert all(float(s[s.index("p99") + 1]) > 0 for s in sides)
    assert "after/before by round: req/s" in r.stdout
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True,
                            text=True).stdout
    assert len(listed.splitlines()) == 1  # its checkout of the other revision is gone


def test_lane_parts_measures_each_variant() -> None:
    """bench/lane_parts.py edits the rendered config by its filters' names: every variant must
    still serve the request by the lane (a renamed filter would leave a variant measuring
    nothing, or the ext_proc path), and the compiled lane's records must all arrive."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "lane_parts.py"), "--rounds", "1",
                        "--duration", "1", "--conc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {line[:16].strip(): line[16:].split() for line in r.stdout.splitlines()
            if line.startswith("  ") and not line.strip().startswith("variant")}
    assert list(rows) == ["bare", "routing", "+ record", "+ answers", "+ both", "lane",
                          "lane compiled"], r.stdout
    assert all(float(v[0]) > 0 and "NON-2XX" not in v for v in rows.values())
    assert "OFF THE LANE" not in r.stdout, r.stdout
    assert float(rows["routing"][4]) < float(rows["+ record"][4])  # the service: records only
    got, sent = re.search(r"lane compiled: records received (\d+) for (\d+)", r.stdout).groups()
    # (wrk does not count the requests in flight when it stops, up to its concurrency in each
    # of its two runs, a warm-up and a round: Envoy answered and recorded them)
    assert int(sent) <= int(got) <= int(sent) + 2 * 2, r.stdout


def test_envoy_instructions_counts_each_target() -> None:
    """bench/envoy_instructions.py runs Envoy under callgrind for each target and prints its
    instructions per request: the compiled lane does more than bare Envoy."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "envoy_instructions.py"),
                        "--requests", "50", "--targets", "bare,compiled"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    counts = {m[0]: int(m[1].replace(",", ""))
              for m in re.findall(r"^  (\w+) +([\d,]+)", r.stdout, re.M)}
    assert set(counts) == {"bare", "compiled"}, r.stdout
    assert 0 < counts["bare"] < counts["compiled"], r.stdout
