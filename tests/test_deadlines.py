"""Cheap overload: waiters expire from the head of one deadline heap, a batch per loop turn."""

from __future__ import annotations

import asyncio
import random

import anyio
import pytest
from _postgres import PostgresCluster
from _support import drained, tenant_dsn

from tenantpool import PoolSettings, PoolTimeout, Target, TenantPoolManager
from tenantpool._deadlines import Deadlines

pytestmark = pytest.mark.anyio


class Waiter:
    def __init__(self, name: int) -> None:
        self.name = name
        self.waiting = True


class Book:
    """Stands in for the pools: records expiries, and the loop turn each happened in."""

    def __init__(self) -> None:
        self.expired: list[tuple[int, int]] = []  # (waiter, turn)
        self.turn = 0
        self.deadlines: Deadlines[Waiter] = Deadlines(self.expire, batch=100)

    def expire(self, waiter: Waiter) -> None:
        self.expired.append((waiter.name, self.turn))
        self.leave(waiter)

    def leave(self, waiter: Waiter) -> None:
        waiter.waiting = False
        self.deadlines.left()

    async def count_turns(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.turn += 1


async def test_waiters_expire_in_deadline_order_and_served_ones_never() -> None:
    book = Book()
    now = asyncio.get_running_loop().time()
    rng = random.Random(3)
    offsets = list(range(200))
    rng.shuffle(offsets)  # quota waits start earlier: deadlines come out of arrival order
    waiters = {i: Waiter(i) for i in offsets}
    for i in offsets:
        book.deadlines.add(now + 0.05 + i * 0.0005, waiters[i])
    served = set(rng.sample(offsets, 50))
    for i in served:
        book.leave(waiters[i])
    with anyio.fail_after(10):
        while len(book.deadlines):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert [name for name, _ in book.expired] == sorted(set(offsets) - served)


async def test_a_crowd_expiring_together_is_spread_over_loop_turns() -> None:
    book = Book()
    now = asyncio.get_running_loop().time()
    for i in range(1000):
        book.deadlines.add(now, Waiter(i))
    async with anyio.create_task_group() as tg:
        tg.start_soon(book.count_turns)
        with anyio.fail_after(10):
            while len(book.deadlines):  # noqa: ASYNC110
                await asyncio.sleep(0)
        tg.cancel_scope.cancel()
    assert len(book.expired) == 1000
    per_turn: dict[int, int] = {}
    for _, turn in book.expired:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) <= 100
    assert len(per_turn) >= 10


async def test_entries_of_served_waiters_do_not_pile_up() -> None:
    book = Book()
    now = asyncio.get_running_loop().time()
    for i in range(10_000):
        waiter = Waiter(i)
        book.deadlines.add(now + 60, waiter)
        if i % 10:
            book.leave(waiter)  # served at once, as most checkouts are
    assert len(book.deadlines) == 1000
    assert len(book.deadlines._heap) <= 2 * 1000 + 64
    for _ in range(1000):
        book.leave(Waiter(-1))
    assert not book.deadlines._heap and book.deadlines._timer is None


async def test_thousands_of_checkouts_queued_at_the_cap_each_time_out(
    pg: PostgresCluster,
) -> None:
    dsn = pg.dsn()
    targets = {f"t{i}": Target(tenant_dsn(dsn, f"t{i}")) for i in range(21)}
    settings = PoolSettings(acquire_timeout=0.5)
    async with TenantPoolManager(targets, max_total_connections=1, pool=settings) as manager:
        timeouts = 0
        hold = anyio.Event()
        held = anyio.Event()

        async def holder() -> None:
            async with manager.with_connection("t0"):
                held.set()
                await hold.wait()

        async def checkout(tenant: str) -> None:
            nonlocal timeouts
            try:
                async with manager.with_connection(tenant):
                    pass
            except PoolTimeout:
                timeouts += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await held.wait()
                async with anyio.create_task_group() as crowd:
                    for i in range(2000):
                        crowd.start_soon(checkout, f"t{1 + i % 20}")
                hold.set()
        assert timeouts == 2000
        stats = manager.stats()
        assert stats.timeouts == 2000 and stats.waiting == 0
        assert len(manager._deadlines) == 0 and manager._capacity.waiting == 0
        await drained(manager)
