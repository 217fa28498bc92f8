"""The single-tenant contenders of the checkout and throughput scenarios.

Each is one ``checkout + SELECT 1 + release`` for the RLS tenant ``acme`` (the bare connection
sets its tenant once; it is the floor no pool can beat). Every contender holds at most ``size``
connections, so concurrent runs compare like with like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from tenantpool import PoolSettings, Target, TenantPoolManager

from ._harness import wait_until

Step = Callable[[], Awaitable[object]]

TENANT = "acme"
SET_TENANT = "SELECT set_config('app.tenant_id', $1, false)"

BARE = "bare asyncpg connection(s)"
POOL = "asyncpg.Pool (default reset)"
POOL_SET = "asyncpg.Pool + set_config"
PSYCOPG = "psycopg_pool + set_config"
TENANTPOOL = "tenantpool (RLS setting)"


@contextlib.asynccontextmanager
async def contenders(dsn: str, size: int) -> AsyncIterator[dict[str, Step]]:
    async with contextlib.AsyncExitStack() as stack:
        # The floor: connections handed out by a bare queue, no reset, tenant set once.
        queue: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
        for _ in range(size):
            conn = await asyncpg.connect(dsn)
            stack.push_async_callback(conn.close)
            await conn.execute(SET_TENANT, TENANT)
            queue.put_nowait(conn)

        async def bare() -> None:
            conn = await queue.get()
            try:
                await conn.fetchval("SELECT 1")
            finally:
                queue.put_nowait(conn)

        pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
        stack.push_async_callback(pool.close)

        async def asyncpg_pool() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")

        async def asyncpg_pool_set_config() -> None:
            async with pool.acquire() as conn:
                await conn.execute(SET_TENANT, TENANT)
                await conn.fetchval("SELECT 1")

        # Imported here: the bench extra's, not the test suite's (see the runner's NEEDS).
        import psycopg
        import psycopg_pool

        # autocommit: otherwise psycopg wraps each checkout in a transaction and adds a COMMIT.
        ppool = psycopg_pool.AsyncConnectionPool(
            psycopg.conninfo.make_conninfo(dsn),
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True},
            open=False,
        )
        await ppool.open(wait=True)
        stack.push_async_callback(ppool.close)

        async def psycopg_set_config() -> None:
            async with ppool.connection() as conn:
                await conn.execute("SELECT set_config('app.tenant_id', %s, false)", (TENANT,))
                await (await conn.execute("SELECT 1")).fetchone()

        manager = TenantPoolManager(
            {TENANT: Target(dsn, settings={"app.tenant_id": TENANT})},
            pool=PoolSettings(min_size=size, max_size=size),
        )
        await stack.enter_async_context(manager)
        # Open the pool's connections before timing, as the peers' pools do at creation.
        async with manager.with_connection(TENANT):
            pass
        await wait_until(lambda: manager.stats().idle == size, 10, "tenantpool's min_size")

        async def tenantpool() -> None:
            async with manager.with_connection(TENANT) as conn:
                await conn.fetchval("SELECT 1")

        yield {
            BARE: bare,
            POOL: asyncpg_pool,
            POOL_SET: asyncpg_pool_set_config,
            PSYCOPG: psycopg_set_config,
            TENANTPOOL: tenantpool,
        }
