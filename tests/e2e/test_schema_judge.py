"""The schema judge's child processes: client schemas are checked with no I/O, bounded in time
(a stuck check is killed, the event loop keeps running) and anything undecidable is unjudged."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from extproc.core.capabilities import PASS, UNJUDGED
from extproc.effects.schema_judge import SchemaJudge

SCHEMA = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}


@pytest.fixture
async def judge():
    j = SchemaJudge(timeout_s=1.0, workers=2, max_schema_bytes=4096)
    await j.warm()
    yield j
    await j.close()


async def test_pass_and_fail_name_the_keyword_only(judge: SchemaJudge) -> None:
    assert await judge.judge(SCHEMA, ('{"city": "Oslo"}',)) == PASS
    v = await judge.judge(SCHEMA, ('{"city": "Oslo"}', '{"city": 12345678}'))
    assert v.ok is False and v.reason == "json: does not match the schema (keyword 'type' failed)"


async def test_remote_refs_are_never_fetched(judge: SchemaJudge) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        port = srv.getsockname()[1]
        for ref in (f"http://127.0.0.1:{port}/s.json", f"https://127.0.0.1:{port}/s.json"):
            assert await judge.judge({"$ref": ref}, ("{}",)) == UNJUDGED
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    # The bundled meta-schemas still resolve (no network needed for them).
    meta = {"$ref": "https://json-schema.org/draft/2020-12/schema"}
    assert (await judge.judge(meta, ('{"type": 5}',))).ok is False


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"type": 5},                                   # not a valid schema
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
])
async def test_undecidable_schemas_are_unjudged(judge: SchemaJudge, schema: dict) -> None:
    assert await judge.judge(schema, ('{"a": 1}',)) == UNJUDGED


async def test_catastrophic_regex_is_killed_and_the_loop_keeps_running(judge: SchemaJudge) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    t0 = time.monotonic()
    v = await judge.judge({"pattern": "^(a+)+$"}, ('"' + "a" * 40 + '!"',))
    elapsed = time.monotonic() - t0
    ticker.cancel()
    assert v == UNJUDGED and elapsed < 1.5
    assert ticks > 50  # the event loop was never blocked
    # The killed child is replaced: checks go on.
    assert (await judge.judge(SCHEMA, ("{}",))).ok is False


async def test_quadratic_unique_items_is_bounded(judge: SchemaJudge) -> None:
    big = "[" + ",".join(f'{{"a": {i}}}' for i in range(60000)) + "]"
    t0 = time.monotonic()
    assert await judge.judge({"uniqueItems": True}, (big,)) == UNJUDGED
    assert time.monotonic() - t0 < 2


async def test_oversized_schema_is_unjudged_without_a_child(judge: SchemaJudge) -> None:
    assert await judge.judge({"description": "x" * 10000}, ("{}",)) == UNJUDGED


async def test_checks_queue_within_the_budget() -> None:
    """Two children, three stuck checks: the third waits for a free child only as long as
    its budget allows, then passes unjudged."""
    j = SchemaJudge(timeout_s=0.5, workers=2)
    try:
        await j.warm()
        stuck = ({"pattern": "^(a+)+$"}, ('"' + "a" * 40 + '!"',))
        t0 = time.monotonic()
        out = await asyncio.gather(*(j.judge(*stuck) for _ in range(3)))
        assert out == [UNJUDGED] * 3 and time.monotonic() - t0 < 2.5
    finally:
        await j.close()
