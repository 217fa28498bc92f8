"""Who gets which connection: reuse before growth, first freed first served (issue 10, 1-2)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster
from _support import drained, server_connections, tenant_dsn, until

from tenantpool import PoolSettings, Target, TenantPoolManager

pytestmark = pytest.mark.anyio


async def test_sequential_checkouts_hold_at_most_two_connections(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    """The released connection is still being reset when the next checkout comes: the pool
    opens a second one at most (each checkout then takes the one not being reset), never
    more, however many checkouts follow."""
    targets = {"a": Target(pg.dsn(*login), settings={"app.tenant_id": "a"})}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=10)) as manager:
        peak = 0
        for _ in range(50):
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
                peak = max(peak, manager.stats().total)
        await drained(manager)
        assert 1 <= peak <= 2
        assert manager.stats().total <= 2
        assert await server_connections(pg, login[0]) <= 2
        assert manager.stats().steals == 0


async def test_sequential_checkouts_at_the_cap_steal_nothing(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    dsn = pg.dsn(*login)
    names = ("a", "b", "c", "d")
    targets = {t: Target(tenant_dsn(dsn, t)) for t in names}
    async with TenantPoolManager(targets, max_total_connections=4) as manager:
        for tenant in names:  # every tenant warm: the cap is full of idle connections
            async with manager.with_connection(tenant) as conn:
                await conn.execute("SELECT 1")
        await drained(manager)
        for _ in range(100):
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
        await drained(manager)
        stats = manager.stats()
        assert stats.steals == 0
        assert sorted(p.size for p in stats.pools.values()) == [1, 1, 1, 1]


async def test_a_waiter_takes_the_first_connection_freed_not_the_one_opened_for_it(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    opening = anyio.Event()
    let_open = anyio.Event()
    slow = False

    async def init(conn: asyncpg.Connection) -> None:
        if slow:
            opening.set()
            await let_open.wait()

    targets = {"a": Target(pg.dsn(*login))}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=2), init=init) as manager:
        holder_in = anyio.Event()
        holder_out = anyio.Event()
        served = anyio.Event()

        async def holder() -> None:
            async with manager.with_connection("a") as conn:
                await conn.execute("SELECT 1")
                holder_in.set()
                await holder_out.wait()

        async def waiter() -> None:
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
                served.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holder_in.wait()
            slow = True
            tg.start_soon(waiter)
            with anyio.fail_after(10):
                await opening.wait()  # the waiter made the pool open a second connection
                holder_out.set()  # ... but the holder's comes back first: the waiter takes it
                await served.wait()
            assert manager.stats().pools[next(iter(manager.stats().pools))].opening == 1
            let_open.set()
        await drained(manager)
        # The connection opened for the waiter was kept, idle.
        assert manager.stats().total == 2 and manager.stats().idle == 2


async def test_a_burst_is_served_in_arrival_order_and_barely_grows_the_pool(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    """min_size=5, max_size=10, slow connects, 50 short requests: the 5 connections there
    serve the burst in arrival order; the pool grows by a step, not to max_size."""
    slow = False
    burst_over = anyio.Event()

    async def init(conn: asyncpg.Connection) -> None:
        if slow:  # connects slower than the burst: they end after it
            await burst_over.wait()

    # No session state: the refilled connections already carry it, so no checkout makes a
    # round trip to apply it, and the order served is the order handed out.
    targets = {"a": Target(pg.dsn(*login))}
    settings = PoolSettings(min_size=5, max_size=10)
    async with TenantPoolManager(targets, pool=settings, init=init) as manager:
        # Warm: min_size is refilled in the background once the pool exists.
        async with manager.with_connection("a"):
            pass
        await until(lambda: manager.stats().idle == 5)
        slow = True
        arrived: list[int] = []
        served: list[int] = []

        async def request(i: int) -> None:
            arrived.append(i)
            async with manager.with_connection("a") as conn:
                served.append(i)
                await conn.execute("SELECT pg_sleep(0.002)")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(request, i)
        assert served == arrived
        # The connections there served the whole burst; two more were on their way.
        assert manager.stats().pools[next(iter(manager.stats().pools))].opening == 2
        burst_over.set()
        await drained(manager)
        assert manager.stats().total == 7
