"""Checking answers against a client's JSON schema, in child processes with budgets.

A ``json_schema`` comes from the client, so checking an answer against it is untrusted work:
a remote ``$ref`` would make us fetch a URL the client chose, ``{"$ref": "#"}`` recurses
forever, a ``pattern`` such as ``^(a+)+$`` backtracks for minutes and Python's ``re`` cannot be
interrupted, ``uniqueItems`` over a large array is quadratic. So the check runs in a child
process (``python -m extproc.effects.schema_judge``): references resolve only to the JSON Schema
meta-schemas bundled with ``jsonschema`` (no retrieval), the child has a memory limit, catches
recursion, and is killed and replaced when a check outlasts its time budget. Whatever cannot be
decided (a broken or oversized schema, an unresolvable reference, a budget overrun) is
"unjudged": the answer passes, never a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
from typing import Any

import orjson

from ..core.capabilities import PASS, UNJUDGED, Verdict
from ..logs import log_event

log = logging.getLogger("extproc")
_LEN = struct.Struct(">I")
CHILD_MEMORY_BYTES = 1024 * 1024 * 1024
SPAWN_TIMEOUT_S = 10.0


class _Child:
    """One child process: a request, then its answer, one at a time."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc.effects.schema_judge", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        child = cls(proc)
        assert proc.stdout is not None
        try:  # an empty frame: its imports are done
            await proc.stdout.readexactly(_LEN.size)
        except BaseException:
            child.kill()
            raise
        return child

    async def call(self, payload: bytes) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(_LEN.pack(len(payload)) + payload)
        await self.proc.stdin.drain()
        (n,) = _LEN.unpack(await self.proc.stdout.readexactly(_LEN.size))
        return await self.proc.stdout.readexactly(n)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


class SchemaJudge:
    """A small pool of child processes; each check waits for a free one within its budget."""

    def __init__(self, timeout_s: float, workers: int = 2, max_schema_bytes: int = 65536):
        self.timeout_s, self.workers, self.max_schema_bytes = timeout_s, workers, max_schema_bytes
        self._idle: asyncio.Queue[_Child] | None = None
        self._started = 0
        self._children: set[_Child] = set()
        self._reapers: set[asyncio.Task[int]] = set()

    async def _acquire(self, deadline: float) -> _Child:
        """An idle child, waited for until ``deadline``; or a new one while the pool is not
        full (starting one takes ~0.2 s, which does not count against a check's budget)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
        if self._idle.empty() and self._started < self.workers:
            self._started += 1
            try:
                child = await asyncio.wait_for(_Child.start(), SPAWN_TIMEOUT_S)
            except BaseException:
                self._started -= 1
                raise
            self._children.add(child)
            return child
        async with asyncio.timeout_at(deadline):
            return await self._idle.get()

    async def warm(self) -> None:
        """Start one child now, so the first check does not wait for it."""
        child = await self._acquire(asyncio.get_running_loop().time() + SPAWN_TIMEOUT_S)
        self._release(child)

    def _release(self, child: _Child) -> None:
        assert self._idle is not None
        self._idle.put_nowait(child)

    def _discard(self, child: _Child) -> None:
        child.kill()
        self._children.discard(child)
        self._started -= 1
        reaper = asyncio.get_running_loop().create_task(child.proc.wait())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    async def judge(self, schema: dict[str, Any], values: tuple[str, ...]) -> Verdict:
        """PASS when every value (JSON text) matches the schema, a failing Verdict naming the
        keyword that failed (never the value: it is model output), else UNJUDGED."""
        payload = orjson.dumps({"schema": schema, "values": values})
        if len(payload) - sum(len(v) for v in values) > self.max_schema_bytes:
            return _unjudged("the schema is over its size budget")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        child: _Child | None = None
        try:
            child = await self._acquire(deadline)
            async with asyncio.timeout(self.timeout_s):
                answer = orjson.loads(await child.call(payload))
        except TimeoutError:
            if child is not None:
                self._discard(child)  # still busy: its work cannot be interrupted otherwise
            return _unjudged(f"the schema check took longer than {self.timeout_s}s")
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError):
            if child is not None:
                self._discard(child)
            return _unjudged("the schema checker failed")
        except BaseException:
            if child is not None:
                self._discard(child)
            raise
        self._release(child)
        if answer.get("ok") is True:
            return PASS
        if answer.get("ok") is False:
            return Verdict(False, f"json: does not match the schema (keyword "
                                  f"'{answer.get('keyword', '?')}' failed)")
        return _unjudged(str(answer.get("why", "undecidable")))

    async def close(self) -> None:
        for child in list(self._children):
            self._discard(child)
        await asyncio.gather(*self._reapers, return_exceptions=True)


def _unjudged(why: str) -> Verdict:
    log_event(log, {"event": "capability.unjudged", "why": why}, logging.WARNING)
    return UNJUDGED


# ---------------------------------------------------------------- the child process

_KEYWORD_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ$")


def _check(request: dict[str, Any]) -> dict[str, Any]:
    from jsonschema import exceptions, validators
    from jsonschema_specifications import REGISTRY  # the meta-schemas; retrieves nothing

    schema = request["schema"]
    try:
        cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        cls.check_schema(schema)
        validator = cls(schema, registry=REGISTRY)
        for text in request["values"]:
            error = next(validator.iter_errors(orjson.loads(text)), None)
            if error is not None:
                keyword = str(error.validator)
                if not (0 < len(keyword) <= 40 and set(keyword) <= _KEYWORD_OK):
                    keyword = "?"
                return {"ok": False, "keyword": keyword}
    except exceptions.SchemaError:
        return {"ok": None, "why": "the schema is not a valid JSON schema"}
    except RecursionError:
        return {"ok": None, "why": "the schema recurses too deeply"}
    except MemoryError:
        return {"ok": None, "why": "the schema check ran out of memory"}
    except Exception as exc:  # unresolvable references and anything else: undecidable
        return {"ok": None, "why": f"the schema check failed ({exc.__class__.__name__})"}
    return {"ok": True}


def main() -> None:
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    import jsonschema_specifications  # noqa: F401 - loaded before the first request
    from jsonschema import validators  # noqa: F401

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_LEN.pack(0))
    stdout.flush()
    while True:
        head = stdin.read(_LEN.size)
        if len(head) < _LEN.size:
            return  # the parent closed the pipe
        (n,) = _LEN.unpack(head)
        try:
            answer = _check(orjson.loads(stdin.read(n)))
        except Exception as exc:
            answer = {"ok": None, "why": f"bad request ({exc.__class__.__name__})"}
        out = orjson.dumps(answer)
        stdout.write(_LEN.pack(len(out)) + out)
        stdout.flush()


if __name__ == "__main__":
    main()
