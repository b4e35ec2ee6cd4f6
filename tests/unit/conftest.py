"""Unit tests start nothing: no process, no socket. An audit hook fails any test that tries
(it is active only while a test under tests/unit runs, so the end-to-end suite in the same
session is unaffected)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

_FORBIDDEN = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn",
                        "os.exec", "os.system", "socket.bind", "socket.connect"})
_active = False


def _hook(event: str, args: tuple[object, ...]) -> None:
    if _active and event in _FORBIDDEN:
        raise RuntimeError(f"a unit test must not start processes or open sockets: {event}")


sys.addaudithook(_hook)


@pytest.fixture(autouse=True)
def _nothing_started() -> Iterator[None]:
    global _active
    _active = True
    try:
        yield
    finally:
        _active = False
