"""The service's allocator tuning (bounded arenas, periodic trim) works on this glibc."""

from __future__ import annotations

import platform

from extproc.shell.server import tune_allocator


def test_allocator_tuning_returns_a_working_trim() -> None:
    trim = tune_allocator()
    if platform.libc_ver()[0] != "glibc":
        assert trim is None
        return
    assert trim is not None
    blocks = [bytearray(4 << 20) for _ in range(8)]  # multi-MB buffers, as bodies are
    del blocks
    assert trim() in (0, 1)  # malloc_trim: 1 when memory went back to the OS
