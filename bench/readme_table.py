"""Print bench/results/latest.json as the Markdown table the README shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

res = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else
                      Path(__file__).parent / "results" / "latest.json").read_text())
print(f"Latest run ({res['machine']}; Envoy `--concurrency 1`):\n")
print("| case | target | p50 ms | p99 ms | req/s | runs (req/s) |\n|---|---|---|---|---|---|")
for c in res["cases"]:
    for t in ("bare Envoy", "Envoy + extproc"):
        v = c[t]
        print(f"| {c['case']} | {t} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['rps']:.0f} | "
              f"{', '.join(map(str, v['spread_rps']))} |")
    print(f"| | **ratio** | **{c['p50_ratio']:.1f}x** | | **{c['rps_ratio']:.2f}x** | |")
