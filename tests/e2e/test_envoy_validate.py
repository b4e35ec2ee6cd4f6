"""The rendered Envoy config is accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

from extproc_dev.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]


def test_envoy_validates_rendered_config() -> None:
    for name in ("demo", "compose"):
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c",
                            str(ROOT / "envoy" / f"{name}.yaml")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "OK" in r.stdout + r.stderr
