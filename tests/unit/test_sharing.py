"""Work shared between requests: slots handed out in turn, one call per key that no single
caller can cancel for the others."""

from __future__ import annotations

import asyncio

import pytest

from extproc.effects.sharing import FairLimiter, SharedCalls


async def test_slots_go_to_each_waiting_owner_in_turn() -> None:
    limiter = FairLimiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def work(owner: str, n: int) -> None:
        async with limiter.slot(owner):
            order.append(f"{owner}{n}")
            await gate.wait()

    first = asyncio.create_task(work("a", 0))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(work("a", n)) for n in range(1, 5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(work("b", 1)))
    tasks.append(asyncio.create_task(work("c", 1)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *tasks)
    # a0 held the slot; then a1, and b and c before a's other three.
    assert order == ["a0", "a1", "b1", "c1", "a2", "a3", "a4"]
    assert limiter.active == 0 and not limiter.waiting


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    limiter = FairLimiter(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("a"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    leaving = asyncio.create_task(limiter._acquire("b"))
    staying = asyncio.create_task(limiter._acquire("c"))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    release.set()
    await holder
    await asyncio.wait_for(staying, 1)  # c got the slot b gave up
    assert limiter.active == 1 and not limiter.waiting


async def test_a_shared_call_outlives_one_caller_and_ends_with_the_last() -> None:
    calls = SharedCalls[str]()
    started, finish = [], asyncio.Event()

    async def slow() -> str:
        started.append(1)
        await finish.wait()
        return "done"

    first = asyncio.create_task(calls.run("k", slow))
    second = asyncio.create_task(calls.run("k", slow))
    await asyncio.sleep(0.01)
    first.cancel()  # the first caller leaves
    await asyncio.sleep(0.01)
    finish.set()
    assert await second == ("done", True)
    assert started == [1] and calls.calls == {}
    with pytest.raises(asyncio.CancelledError):
        await first

    finish.clear()
    alone = asyncio.create_task(calls.run("k2", slow))
    await asyncio.sleep(0.01)
    task = calls.calls["k2"].task
    alone.cancel()  # the only caller leaves: the call is cancelled too
    await asyncio.sleep(0.01)
    assert task.cancelled() and calls.calls == {}


async def test_a_shared_call_failure_reaches_every_caller() -> None:
    calls = SharedCalls[str]()

    async def broken() -> str:
        await asyncio.sleep(0.01)
        raise ValueError("aux down")

    results = await asyncio.gather(calls.run("k", broken), calls.run("k", broken),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
