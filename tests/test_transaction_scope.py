"""``state_scope="transaction"`` on a direct server: each scope is one transaction carrying the
tenant's state, and tenantpool leaves nothing on the server session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster, quote_ident
from _support import cancellation_storm, drained
from _tenancy import Tenancy, observed

from tenantpool import (
    ConnectionReleased,
    PoolSettings,
    Target,
    TenantPoolError,
    TenantPoolManager,
)

pytestmark = pytest.mark.anyio

PER_TRANSACTION = PoolSettings(max_size=1, acquire_timeout=10, state_scope="transaction")
PLAIN = "plain"  # a tenant with no state of its own, to look at a connection between scopes
# What a session shows of state left outside a transaction: settings from SET or
# set_config(..., false), prepared statements (asyncpg's cached ones are named, so they count).
SESSION_SQL = """
SELECT (SELECT pg_catalog.array_agg(name::text ORDER BY name) FROM pg_catalog.pg_settings
         WHERE source = 'session' AND name NOT IN ('application_name', 'client_encoding'))
         AS settings,
       pg_catalog.current_setting('app.tenant_id', true) AS tenant_setting,
       pg_catalog.current_schema()::text AS schema,
       current_user::text AS role,
       (SELECT count(*) FROM pg_catalog.pg_prepared_statements) AS prepared,
       pg_catalog.pg_backend_pid() AS pid
"""


@pytest.fixture(scope="module")
async def world(pg: PostgresCluster) -> AsyncIterator[Tenancy]:
    world = await Tenancy(pg, 3).create()
    yield world
    await world.drop()


def targets(
    pg: PostgresCluster, world: Tenancy, pool: PoolSettings | None = None
) -> dict[str, Target]:
    dsn = pg.dsn(world.login, world.password)
    return {**world.targets(dsn, pool), PLAIN: Target(dsn, pool=pool)}


@pytest.fixture
async def manager(pg: PostgresCluster, world: Tenancy) -> AsyncIterator[TenantPoolManager]:
    async with TenantPoolManager(targets(pg, world), pool=PER_TRANSACTION) as m:
        yield m


async def between_scopes(manager: TenantPoolManager) -> dict[str, object]:
    """The one connection's session, as the next scope finds it."""
    await drained(manager)
    async with manager.with_connection(PLAIN) as conn:
        return dict(await conn.fetchrow(SESSION_SQL))


async def until_state(pg: PostgresCluster, pid: int, state: str) -> None:
    query = "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = $1"
    with anyio.fail_after(10):
        while await pg.fetchval(query, pid) != state:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def notes_of(pg: PostgresCluster, world: Tenancy, body: str) -> list[str]:
    rows = await pg.fetch(
        f"SELECT tenant FROM public.{quote_ident(world.notes)} WHERE body = $1 ORDER BY tenant",
        body,
    )
    return [r["tenant"] for r in rows]


def test_state_scope_is_checked() -> None:
    with pytest.raises(ValueError, match="state_scope"):
        PoolSettings(state_scope="statement")  # type: ignore[arg-type]


async def test_each_tenants_state_lives_in_its_scopes_transaction_only(
    manager: TenantPoolManager, world: Tenancy
) -> None:
    pids = set()
    for tenant in world.tenants * 3:
        async with manager.with_connection(tenant) as conn:
            assert conn.is_in_transaction()
            assert observed(await conn.fetchrow(world.check_sql)) == world.expected(tenant)
            pids.add(conn.get_server_pid())
    session = await between_scopes(manager)
    # One backend served every scope, and between them it carries nothing of theirs, nor
    # anything tenantpool set for itself.
    assert pids == {session["pid"]}
    assert session["settings"] is None
    assert session["tenant_setting"] in (None, "")
    assert session["schema"] == "public"
    assert session["role"] == world.login
    assert session["prepared"] == 0


async def test_the_scope_commits_at_its_end_and_an_exception_rolls_it_back(
    pg: PostgresCluster, manager: TenantPoolManager, world: Tenancy
) -> None:
    insert = f"INSERT INTO public.{quote_ident(world.notes)} VALUES ($1, $2)"
    async with manager.with_connection("t0") as conn:
        await conn.execute(insert, "t0", "kept")
    with pytest.raises(RuntimeError, match="boom"):
        async with manager.with_connection("t1") as conn:
            await conn.execute(insert, "t1", "kept")
            await conn.execute(insert, "t1", "dropped")
            raise RuntimeError("boom")
    assert await notes_of(pg, world, "kept") == ["t0"]
    assert await notes_of(pg, world, "dropped") == []
    await drained(manager)
    assert manager.stats().in_use == 0


async def test_conn_transaction_inside_a_scope_is_a_savepoint(
    pg: PostgresCluster, manager: TenantPoolManager, world: Tenancy
) -> None:
    insert = f"INSERT INTO public.{quote_ident(world.notes)} VALUES ($1, $2)"
    async with manager.with_connection("t2") as conn:
        async with conn.transaction():
            await conn.execute(insert, "t2", "savepoint kept")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(insert, "t2", "savepoint undone")
                await conn.execute("CREATE TEMP TABLE u (id int PRIMARY KEY) ON COMMIT DROP")
                await conn.execute("INSERT INTO u VALUES (1), (1)")
        # The failed savepoint is undone; the scope's transaction and its state go on.
        assert observed(await conn.fetchrow(world.check_sql)) == world.expected("t2")
    assert await notes_of(pg, world, "savepoint kept") == ["t2"]
    assert await notes_of(pg, world, "savepoint undone") == []


async def test_a_nested_scope_of_the_same_tenant_shares_the_transaction(
    manager: TenantPoolManager,
) -> None:
    xid = "SELECT pg_catalog.txid_current()"
    async with manager.with_connection("t0") as outer:
        outer_xid = await outer.fetchval(xid)
        async with manager.with_connection("t0") as inner:
            assert inner is outer
            assert await inner.fetchval(xid) == outer_xid
        assert outer.is_in_transaction()


async def test_ending_the_scopes_transaction_in_user_code_is_refused_at_the_end(
    manager: TenantPoolManager, world: Tenancy
) -> None:
    with pytest.raises(TenantPoolError, match="ended inside the scope"):
        async with manager.with_connection("t0") as conn:
            await conn.execute("COMMIT")
            # From here on nothing of the tenant's state is in force.
            assert await conn.fetchval("SELECT current_user::text") == world.login
    session = await between_scopes(manager)
    assert session["tenant_setting"] in (None, "")
    assert manager.stats().in_use == 0


async def test_a_failing_commit_raises_from_the_scope_and_the_connection_comes_back(
    manager: TenantPoolManager, world: Tenancy
) -> None:
    with pytest.raises(asyncpg.UniqueViolationError):
        async with manager.with_connection("t1") as conn:
            await conn.execute(
                "CREATE TEMP TABLE d (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
                " ON COMMIT DROP; INSERT INTO d VALUES (1), (1)"
            )
    async with manager.with_connection("t1") as conn:
        assert observed(await conn.fetchrow(world.check_sql)) == world.expected("t1")
    assert manager.stats().total == 1


async def test_a_scope_cancelled_mid_query_leaves_no_open_transaction(
    pg: PostgresCluster, manager: TenantPoolManager, world: Tenancy
) -> None:
    started = anyio.Event()
    pid = 0

    async def sleeper() -> None:
        nonlocal pid
        async with manager.with_connection("t0") as conn:
            pid = conn.get_server_pid()
            started.set()
            await conn.execute("SELECT pg_catalog.pg_sleep(60)")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        with anyio.fail_after(10):
            await started.wait()
        # Let the query reach the server before cancelling it.
        await until_state(pg, pid, "active")
        tg.cancel_scope.cancel()
    session = await between_scopes(manager)
    assert session["pid"] == pid
    assert await pg.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "idle"
    assert manager.stats().in_use == 0


async def test_an_unused_scope_is_rolled_back_off_the_callers_path(
    pg: PostgresCluster, manager: TenantPoolManager
) -> None:
    async with manager.with_connection("t0") as conn:
        pid = conn.get_server_pid()
    await drained(manager)
    assert await pg.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "idle"


async def test_asyncpgs_statement_cache_is_off_unless_the_user_turns_it_on(
    pg: PostgresCluster, world: Tenancy
) -> None:
    """Cached statements are named and outlive the transaction: behind a transaction pooler
    the next transaction may reach a server connection that lacks them."""
    count = "SELECT count(*) FROM pg_catalog.pg_prepared_statements"
    async with TenantPoolManager(targets(pg, world), pool=PER_TRANSACTION) as manager:
        for _ in range(3):
            async with manager.with_connection("t0") as conn:
                await conn.fetchval("SELECT $1::int", 1)
                assert await conn.fetchval(count) == 0
    async with TenantPoolManager(
        targets(pg, world), pool=PER_TRANSACTION, connect_kwargs={"statement_cache_size": 10}
    ) as manager:
        async with manager.with_connection("t0") as conn:
            await conn.fetchval("SELECT $1::int", 1)
            assert await conn.fetchval(count) >= 1


async def test_session_and_transaction_pools_side_by_side(
    pg: PostgresCluster, world: Tenancy
) -> None:
    """state_scope is a pool setting: a Target may choose its own."""
    per_transaction = targets(pg, world, PER_TRANSACTION)
    session_dsn = pg.dsn()  # the superuser: another pool
    resolver = {
        "t0": per_transaction["t0"],
        "sess": Target(session_dsn, settings={"app.tenant_id": "sess"}),
    }
    async with TenantPoolManager(resolver) as manager:
        for _ in range(2):
            async with manager.with_connection("t0") as conn:
                assert conn.is_in_transaction()
                assert observed(await conn.fetchrow(world.check_sql)) == world.expected("t0")
            async with manager.with_connection("sess") as conn:
                assert not conn.is_in_transaction()
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == "sess"


async def test_a_child_task_gets_a_connection_and_transaction_of_its_own(
    pg: PostgresCluster, world: Tenancy
) -> None:
    pool = PoolSettings(max_size=2, acquire_timeout=10, state_scope="transaction")
    async with TenantPoolManager(targets(pg, world), pool=pool) as manager:
        xid = "SELECT pg_catalog.txid_current()"
        async with manager.with_connection("t0") as parent:
            parent_xid = await parent.fetchval(xid)

            async def child() -> object:
                assert manager.current_tenant() is None
                async with manager.with_connection("t0") as own:
                    assert own is not parent
                    return await own.fetchval(xid)

            assert await asyncio.create_task(child()) != parent_xid
        # A kept reference never reaches the connection again.
        with pytest.raises(ConnectionReleased):
            await parent.fetchval("SELECT 1")


async def test_cancellation_at_random_points_leaves_no_transaction_open(
    pg: PostgresCluster, world: Tenancy
) -> None:
    pool = PoolSettings(max_size=3, acquire_timeout=10, state_scope="transaction")
    async with TenantPoolManager(targets(pg, world), pool=pool) as manager:

        async def check(conn: asyncpg.Connection, tenant: str) -> None:
            assert observed(await conn.fetchrow(world.check_sql)) == world.expected(tenant)

        await cancellation_storm(manager, world.tenants, check, seed=4321)
        await drained(manager)
        stats = manager.stats()
        assert stats.in_use == 0 and stats.total == stats.idle <= 3
        states = await pg.fetch(
            "SELECT state FROM pg_catalog.pg_stat_activity WHERE usename = $1", world.login
        )
        assert {r["state"] for r in states} <= {"idle"}
        for tenant in world.tenants:
            async with manager.with_connection(tenant) as conn:
                assert observed(await conn.fetchrow(world.check_sql)) == world.expected(tenant)


async def test_listening_is_refused_clearly_per_transaction(manager: TenantPoolManager) -> None:
    def callback(*args: object) -> None:
        raise AssertionError("never called")

    with pytest.raises(TenantPoolError, match="add_listener"):
        async with manager.with_connection("t0") as conn:
            await conn.add_listener("news", callback)
    async with manager.with_connection("t0") as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_catalog.pg_listening_channels()") == 0
