"""Memory soak: large bodies through Envoy + llm-extproc for a while, resident memory sampled.

Alternates 4 MB requests that pass unchanged and 4 MB audio_url requests converted per attempt,
at concurrency 4, and samples the service's and Envoy's RSS every few seconds. Caches are
bounded, so after warm-up memory should stay flat. Writes bench/results/soak.json.

    python bench/soak.py [--seconds 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from extproc_dev.stack import Stack, free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import extproc_config, lua_script, make_bodies  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="extproc-soak-"))
    emu, llama, aux = free_port(), free_port(), free_port()
    cfg = extproc_config(emu, llama, aux)
    cfg["backends"] = cfg["backends"][:2]  # no aux vision needed here
    cfg.pop("vision")
    cfg["backends"][0]["url"] = f"http://127.0.0.1:{emu}/v1"
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    bodies = make_bodies(tmp)
    scripts = [lua_script(tmp, bodies["image_1m"], emu), lua_script(tmp, bodies["audio_4m"], emu)]
    stack = Stack(tmp / "c.yaml", workdir=str(tmp), env={"EMULATOR_NO_RECORD_BODIES": "1"})
    stack.start()
    samples: list[dict] = []
    stop = threading.Event()
    requests = [0]

    def load() -> None:
        i = 0
        while not stop.is_set():
            out = subprocess.run(["wrk", "-t1", "-c4", "-d10s", "-s", str(scripts[i % 2]),
                                  stack.envoy_url + "/v1/chat/completions"],
                                 capture_output=True, text=True)
            for line in out.stdout.splitlines():
                if "requests in" in line:
                    requests[0] += int(line.split()[0])
            i += 1

    t = threading.Thread(target=load)
    t.start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < args.seconds:
            time.sleep(10)
            samples.append({"t_s": round(time.monotonic() - t0),
                            "service_mb": round(rss_mb(stack.procs["service"].pid), 1),
                            "envoy_mb": round(rss_mb(stack.procs["envoy"].pid), 1),
                            "requests": requests[0]})
            print(samples[-1], flush=True)
    finally:
        stop.set()
        t.join(timeout=30)
        stack.stop()
    warm = [s for s in samples if s["t_s"] >= min(60, args.seconds // 3)] or samples
    result = {"seconds": args.seconds, "requests": requests[0], "samples": samples,
              "service_mb_after_warmup": [min(s["service_mb"] for s in warm),
                                          max(s["service_mb"] for s in warm)],
              "envoy_mb_after_warmup": [min(s["envoy_mb"] for s in warm),
                                        max(s["envoy_mb"] for s in warm)]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{requests[0]} requests of 1-4 MB in {args.seconds} s; service RSS after warm-up "
          f"{result['service_mb_after_warmup'][0]}-{result['service_mb_after_warmup'][1]} MB, "
          f"Envoy {result['envoy_mb_after_warmup'][0]}-{result['envoy_mb_after_warmup'][1]} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
