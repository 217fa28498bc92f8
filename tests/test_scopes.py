"""Scopes as the contract fixes them: nesting, task ownership, use after the scope, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster
from _support import cancellation_storm, drained

from tenantpool import (
    ConnectionReleased,
    NoCurrentConnection,
    PoolSettings,
    Target,
    TenantPoolError,
    TenantPoolManager,
)

pytestmark = pytest.mark.anyio

TENANTS = ("acme", "globex", "initech")


def rls_targets(dsn: str, pool: PoolSettings | None = None) -> dict[str, Target]:
    return {t: Target(dsn, settings={"app.tenant_id": t}, pool=pool) for t in TENANTS}


@pytest.fixture
async def manager(pg: PostgresCluster) -> AsyncIterator[TenantPoolManager]:
    async with TenantPoolManager(
        rls_targets(pg.dsn()), pool=PoolSettings(max_size=2, acquire_timeout=5)
    ) as m:
        yield m


async def tenant_of(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT current_setting('app.tenant_id')"))


async def test_outside_any_scope(manager: TenantPoolManager) -> None:
    assert manager.current_tenant() is None
    with pytest.raises(NoCurrentConnection):
        manager.current_connection()
    with pytest.raises(NoCurrentConnection):
        async with manager.connection():
            pass


async def test_scope_sets_current_connection_and_tenant(manager: TenantPoolManager) -> None:
    async with manager.with_connection("acme") as conn:
        assert manager.current_connection() is conn
        assert manager.current_tenant() == "acme"
        assert await tenant_of(conn) == "acme"
        async with manager.connection() as same:
            assert same is conn
    assert manager.current_tenant() is None


async def test_nesting_other_tenant_restores_the_outer_one(manager: TenantPoolManager) -> None:
    async with manager.with_connection("acme") as acme:
        async with manager.with_connection("globex") as globex:
            assert globex is not acme
            assert manager.current_connection() is globex
            assert manager.current_tenant() == "globex"
            assert await tenant_of(globex) == "globex"
            assert manager.stats().in_use == 2
        assert manager.current_connection() is acme
        assert manager.current_tenant() == "acme"
        assert await tenant_of(acme) == "acme"
    await drained(manager)


async def test_nesting_same_tenant_reuses_without_a_second_checkout(pg: PostgresCluster) -> None:
    # max_size=1 and a short timeout: a second checkout would deadlock and time out.
    settings = PoolSettings(max_size=1, acquire_timeout=0.5)
    async with TenantPoolManager(rls_targets(pg.dsn()), pool=settings) as manager:
        async with manager.with_connection("acme") as outer:
            async with manager.with_connection("acme") as inner:
                assert inner is outer
                assert manager.stats().in_use == 1
                async with manager.with_connection("acme") as innermost:
                    assert innermost is outer
                    assert await tenant_of(innermost) == "acme"
            # The inner exit gave nothing back: the outer connection still works.
            assert await outer.fetchval("SELECT 1") == 1
            assert manager.current_connection() is outer
        await drained(manager)


async def test_same_tenant_under_another_reuses_the_outermost(pg: PostgresCluster) -> None:
    async with TenantPoolManager(
        {
            "acme": Target(pg.dsn(), settings={"app.tenant_id": "acme"}),
            "globex": Target(pg.dsn(), settings={"app.tenant_id": "globex"}),
        },
        pool=PoolSettings(max_size=2, acquire_timeout=0.5),
    ) as manager:
        async with manager.with_connection("acme") as acme:
            async with manager.with_connection("globex"):
                async with manager.with_connection("acme") as again:
                    assert again is acme
                    assert manager.current_tenant() == "acme"
                assert manager.current_tenant() == "globex"


async def test_connection_opens_a_scope_on_the_default_tenant(pg: PostgresCluster) -> None:
    async with TenantPoolManager(rls_targets(pg.dsn()), default_tenant="initech") as manager:
        async with manager.connection() as conn:
            assert manager.current_tenant() == "initech"
            assert await tenant_of(conn) == "initech"
        assert manager.current_tenant() is None


async def test_child_task_never_sees_the_parents_connection(manager: TenantPoolManager) -> None:
    seen: dict[str, object] = {}

    async def child() -> None:
        seen["tenant"] = manager.current_tenant()
        try:
            manager.current_connection()
        except NoCurrentConnection as exc:
            seen["error"] = exc
        async with manager.with_connection("acme") as own:
            seen["pid"] = own.get_server_pid()
            seen["own_tenant"] = await tenant_of(own)

    async with manager.with_connection("acme") as parent:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        await asyncio.create_task(child())
        assert seen["own_tenant"] == "acme"
        assert seen["pid"] != parent.get_server_pid()
        assert isinstance(seen["error"], NoCurrentConnection)
        assert seen["tenant"] is None
        assert manager.current_connection() is parent
    await drained(manager)


async def test_connection_used_after_its_scope_raises(manager: TenantPoolManager) -> None:
    async with manager.with_connection("acme") as conn:
        fetchval = conn.fetchval
        transaction = conn.transaction
        assert await fetchval("SELECT 1") == 1
    for call in (
        lambda: conn.fetchval("SELECT 1"),
        lambda: fetchval("SELECT 1"),
        lambda: conn.execute("SELECT 1"),
    ):
        with pytest.raises(ConnectionReleased) as info:
            await call()
        assert isinstance(info.value, TenantPoolError)
    with pytest.raises(ConnectionReleased):
        transaction()
    with pytest.raises(ConnectionReleased):
        conn.get_server_pid()
    with pytest.raises(ConnectionReleased):
        _ = conn._protocol  # type: ignore[attr-defined]
    assert "released" in repr(conn)


async def test_stale_reference_cannot_query_for_the_next_tenant(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1)
    async with TenantPoolManager(rls_targets(pg.dsn()), pool=settings) as manager:
        async with manager.with_connection("acme") as acme:
            pid = acme.get_server_pid()
            stale_fetch = acme.fetchval
        async with manager.with_connection("globex") as globex:
            assert globex.get_server_pid() == pid  # the same backend, now globex's
            with pytest.raises(ConnectionReleased):
                await stale_fetch("SELECT current_setting('app.tenant_id')")
            assert await tenant_of(globex) == "globex"


async def test_exception_in_scope_propagates_and_returns_the_connection(
    manager: TenantPoolManager,
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with manager.with_connection("acme") as conn:
            await conn.fetchval("SELECT 1")
            1 / 0  # noqa: B018
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with manager.with_connection("acme") as conn:
            await conn.fetchval("SELECT 1/0")
    assert manager.current_tenant() is None
    await drained(manager)


async def test_cancelled_while_waiting_for_a_connection(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1, acquire_timeout=10)
    async with TenantPoolManager(rls_targets(pg.dsn()), pool=settings) as manager:
        async with manager.with_connection("acme"):
            with anyio.move_on_after(0.1) as scope:
                async with manager.with_connection("globex"):
                    pytest.fail("must not get a connection while the only one is held")
            assert scope.cancelled_caught
            assert manager.stats().waiting == 0
        await drained(manager)
        async with manager.with_connection("globex") as conn:
            assert await tenant_of(conn) == "globex"


async def test_cancelled_mid_query_leaves_nothing_checked_out(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1)
    async with TenantPoolManager(rls_targets(pg.dsn()), pool=settings) as manager:
        with anyio.move_on_after(0.2) as scope:
            async with manager.with_connection("acme") as conn:
                pid = conn.get_server_pid()
                await conn.execute("BEGIN")
                await conn.execute("SELECT pg_advisory_lock(7)")
                await conn.fetchval("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        await drained(manager)
        # The backend stopped sleeping, rolled back, and released the lock.
        activity = await pg.fetch("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
        assert [row["state"] for row in activity] in ([], ["idle"])
        assert await pg.fetchval("SELECT pg_try_advisory_lock(7)") is True
        async with manager.with_connection("globex") as conn:
            assert conn.get_server_pid() == pid  # reset and reused, not leaked
            assert not conn.is_in_transaction()
            assert await tenant_of(conn) == "globex"


async def test_cancellation_at_random_points_never_leaks(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=3, acquire_timeout=10)
    async with TenantPoolManager(rls_targets(pg.dsn()), pool=settings) as manager:

        async def check(conn: asyncpg.Connection, tenant: str) -> None:
            assert await tenant_of(conn) == tenant

        await cancellation_storm(manager, TENANTS, check, seed=1234)
        await drained(manager)
        stats = manager.stats()
        assert stats.total == stats.idle <= 3
        server_side = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '' "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND datname = current_database() AND usename = current_user"
        )
        assert server_side >= stats.total
        for tenant in TENANTS:
            async with manager.with_connection(tenant) as conn:
                assert await tenant_of(conn) == tenant
                assert not conn.is_in_transaction()


async def test_a_connection_closed_by_user_code_is_dropped(manager: TenantPoolManager) -> None:
    async with manager.with_connection("acme") as conn:
        await conn.close()
    await drained(manager)
    assert manager.stats().total == 0
    async with manager.with_connection("acme") as conn:
        assert await tenant_of(conn) == "acme"


async def test_the_scope_context_object_cannot_be_entered_twice(
    manager: TenantPoolManager,
) -> None:
    scope = manager.with_connection("acme")
    async with scope:
        with pytest.raises(RuntimeError):
            async with scope:
                pass


async def test_a_scope_ended_from_a_context_that_never_saw_it_is_still_released(
    pg: PostgresCluster,
) -> None:
    """Frameworks may end a scope in another context than the one it began in; one that
    never held it (a task made before the scope began) must still give the connection back."""
    async with TenantPoolManager({"acme": Target(pg.dsn())}) as manager:
        opened = manager.with_connection("acme")
        began = asyncio.Event()

        async def end_later() -> None:
            await began.wait()
            await opened.__aexit__(None, None, None)

        ender = asyncio.get_running_loop().create_task(end_later())  # its context: no scope
        conn = await opened.__aenter__()
        began.set()
        await ender
        with pytest.raises(ConnectionReleased):
            await conn.fetchval("SELECT 1")
        await drained(manager)
