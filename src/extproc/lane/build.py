"""Builds the compiled fast lane (``lane.c``) for Envoy with the system's C compiler.

Envoy loads a dynamic module by name, ``lib<name>.so``, from the directory in
``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``: ``build`` returns that directory. The library is built
once per source (its hash names the directory, under ~/.cache/llm-extproc), so a changed
``lane.c`` is rebuilt and an unchanged one costs nothing. The module speaks Envoy 1.40's ABI
(v0.2.0), which another Envoy may load without complaint and then call wrongly: ``check_envoy``
refuses any other version. ``choose`` settles ``envoy.fast_lane_compiled: auto`` for an Envoy
started on this host: compiled when both hold, else the Lua lane and why.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config import Config
from ..core.fast_lane import lanes

SOURCE = Path(__file__).with_name("lane.c")
MODULE = "extproc_lane"  # (the name the rendered config loads)
ENVOY_VERSION = "1.40"
SEARCH_PATH = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"


class LaneBuildError(RuntimeError):
    pass


def build(cache: Path | None = None) -> Path:
    """The directory holding lib<MODULE>.so for the current source (built if missing)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "llm-extproc" / "lane"
    out = root / digest
    lib = out / f"lib{MODULE}.so"
    if lib.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not shutil.which(cc):
        raise LaneBuildError("envoy.fast_lane_compiled needs a C compiler (cc): "
                             "apt-get install gcc, or set CC")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            built = Path(tmp) / lib.name
            done = subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-pthread", "-o",
                                   str(built), str(SOURCE)], capture_output=True, text=True)
            if done.returncode:
                raise LaneBuildError(f"building {SOURCE.name} failed:\n{done.stderr[-2000:]}")
            built.replace(lib)  # (whole or not at all: another process may be loading it)
    except OSError as exc:  # (a cache not writable, a compiler that cannot run)
        raise LaneBuildError(f"building {SOURCE.name} in {out} failed: {exc}") from None
    return out


def check_envoy(binary: str) -> None:
    """Refuses an Envoy whose module ABI the lane was not written for."""
    text = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"/(\d+\.\d+)\.\d+/", text)
    if not found or found.group(1) != ENVOY_VERSION:
        raise LaneBuildError(f"envoy.fast_lane_compiled is written for Envoy {ENVOY_VERSION}; "
                             f"{binary} is {found.group(1) if found else 'of unknown version'}"
                             " (false or auto: the Lua lane)")


def environment(binary: str, cache: Path | None = None) -> dict[str, str]:
    """What Envoy's environment needs for the rendered config to load the lane."""
    check_envoy(binary)
    return {SEARCH_PATH: str(build(cache))}


def choose(cfg: Config, binary: str, cache: Path | None = None
           ) -> tuple[Config, dict[str, str], str]:
    """The lane the Envoy at ``binary``, started on this host, runs for ``cfg``: the config
    with ``envoy.fast_lane_compiled`` settled (``auto`` becomes true when the module builds
    here and that Envoy is 1.40, else false), what Envoy's environment needs, and one line
    saying which lane and why. True insists (``LaneBuildError`` when it cannot be)."""
    asked = cfg.envoy.fast_lane_compiled
    if not lanes(cfg)[0]:
        return cfg, {}, "fast lane: none (no model qualifies: extproc check says why)"
    if asked is False:
        return cfg, {}, "fast lane: Lua (envoy.fast_lane_compiled: false)"
    try:
        env = environment(binary, cache)
    except LaneBuildError as exc:
        if asked is True:
            raise
        first = str(exc).splitlines()[0]
        return settled(cfg, False), {}, f"fast lane: Lua, not compiled: {first}"
    return settled(cfg, True), env, "fast lane: compiled (lane.c, an Envoy dynamic module)"


def settled(cfg: Config, compiled: bool) -> Config:
    """``cfg`` with ``envoy.fast_lane_compiled`` set to ``compiled``."""
    envoy = cfg.envoy.model_copy(update={"fast_lane_compiled": compiled})
    return cfg.model_copy(update={"envoy": envoy})
