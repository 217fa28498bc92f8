"""close() gates every checkout, those inside the resolver included, and awaits every task."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from _postgres import PostgresCluster
from _support import server_connections

from tenantpool import ManagerClosed, Target, TenantPoolManager

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("resolver_ttl", [0.0, 60.0], ids=["uncached", "cached"])
async def test_a_checkout_inside_the_resolver_at_close_creates_no_pool(
    pg: PostgresCluster, login: tuple[str, str], resolver_ttl: float
) -> None:
    inside = anyio.Event()
    answer = anyio.Event()

    async def resolver(tenant: str) -> Target:
        inside.set()
        await answer.wait()
        return Target(pg.dsn(*login))

    manager = TenantPoolManager(resolver, resolver_ttl=resolver_ttl)
    await manager.start()

    async def checkout() -> None:
        async with manager.with_connection("acme"):
            pass

    task = asyncio.create_task(checkout())
    with anyio.fail_after(10):
        await inside.wait()
        await manager.close()
        answer.set()
        with pytest.raises(ManagerClosed):
            await task
    assert not manager._pools
    assert len(manager._supervisor) == 0
    assert await server_connections(pg, login[0]) == 0


async def test_close_leaves_no_task_of_the_manager_running(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    async with TenantPoolManager({"a": Target(pg.dsn(*login))}) as manager:
        async with anyio.create_task_group() as tg:
            for _ in range(5):

                async def use() -> None:
                    async with manager.with_connection("a") as conn:
                        await conn.execute("SET work_mem = '8MB'")

                tg.start_soon(use)
        # Resets are in flight as close() begins; they end, and close their connections.
        assert manager.stats().pools
    assert len(manager._supervisor) == 0
    with anyio.fail_after(10):  # the server ends a closed backend a moment later
        while await server_connections(pg, login[0]):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_close_right_after_a_release_closes_the_connection_being_reset(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    """With close_timeout=0, close() cancels a reset task that has not run its first step yet:
    its connection must still be closed, not left open and counted as being reset."""
    manager = TenantPoolManager({"a": Target(pg.dsn(*login))}, close_timeout=0)
    await manager.start()
    async with manager.with_connection("a") as conn:
        await conn.execute("SET work_mem = '8MB'")
    # The release set the connection aside; its reset task has not started.
    assert manager.stats().pools and next(iter(manager.stats().pools.values())).releasing == 1
    await manager.close()
    assert manager.stats().total == 0
    with anyio.fail_after(10):  # the server ends a closed backend a moment later
        while await server_connections(pg, login[0]):  # noqa: ASYNC110
            await anyio.sleep(0.01)
