"""The compiled lane's readers under AddressSanitizer and UndefinedBehaviorSanitizer: hostile
bodies and answers (tests/native/lane_fuzz.c) must not read past a buffer, leak, or overflow;
nor may the records' batching, whose every line arrives whole or is counted lost. A bug there
would take Envoy down, not one request. (LANE_FUZZ_ITERATIONS scales it.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HARNESS = Path(__file__).parents[1] / "native" / "lane_fuzz.c"


def test_hostile_input_reads_safely(tmp_path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "make test installs a C compiler"
    exe = tmp_path / "lane_fuzz"
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-pthread", "-o", str(exe), str(HARNESS)],
                   check=True, capture_output=True, text=True)
    done = subprocess.run([str(exe), os.environ.get("LANE_FUZZ_ITERATIONS", "30000")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bodies, fast = map(int, done.stderr.split()[::2][:2])
    assert bodies > 0 and 0 < fast < bodies, done.stderr
