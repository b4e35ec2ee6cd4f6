"""Print bench/results/latest.json as the Markdown table docs/benchmark.md shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
res = json.loads(path.read_text())
print(f"Latest full run ({res['machine']}; Envoy `--concurrency 1`; "
      f"{res['duration_s']:.0f} s x {res['repeat']} per target):\n")
print("| case | target | p50 ms | p99 ms | req/s | runs (req/s) | CPU ms/request |")
print("|---|---|---|---|---|---|---|")
for c in res["cases"]:
    for target, v in c.items():
        if not isinstance(v, dict) or target == "ratios":
            continue
        cpu = ", ".join(f"{k} {x:.2f}" for k, x in v["cpu_ms_per_req"].items() if x >= 0.005)
        extra = f" ({v['non_2xx']} non-2xx)" if v["non_2xx"] else ""
        print(f"| {c['case']} | {target}{extra} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
              f"{v['rps']:.0f} | {', '.join(map(str, v['spread_rps']))} | {cpu} |")
    ratios = ", ".join(f"{k} **{x:.2f}**" for k, x in c["ratios"].items())
    print(f"| | **ratios** | {ratios} | | | | |")
st = res.get("streaming_ttfb")
if st:
    parts = ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in st.items() if isinstance(v, dict))
    print(f"\nForced-tools streaming, time to first byte, p50 (SSE events "
          f"{st['event_gap_ms']:.0f} ms apart; the deciding `tool_calls` delta is the second "
          f"event): {parts}.")
    hold = st.get("c hold (forced)", {})
    if "after_deciding_event_p50_ms" in hold:
        print(f"With the hold, the client's first byte came "
              f"**{hold['after_deciding_event_p50_ms']:.2f} ms** p50 "
              f"({hold['after_deciding_event_p99_ms']:.2f} ms p99) after the emulator wrote "
              "the deciding event (both read the machine's monotonic clock).")
