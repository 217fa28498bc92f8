"""The edges of a scope: listener callbacks, out-of-order exits, threads, what a connection is,
what ``init`` leaves, settings between tenants, schemas that differ, and running off asyncio."""

from __future__ import annotations

import asyncio
import inspect
import logging
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster, quote_ident, unique_name
from _support import drained

from tenantpool import (
    ConnectionReleased,
    InvalidTenant,
    NoCurrentConnection,
    PoolSettings,
    Target,
    TenantPoolError,
    TenantPoolManager,
)

pytestmark = pytest.mark.anyio

TENANTS = ("acme", "globex")


@pytest.fixture
async def manager(pg: PostgresCluster) -> AsyncIterator[TenantPoolManager]:
    # One connection: every checkout reuses the backend the previous scope had.
    targets = {t: Target(pg.dsn(), settings={"app.tenant_id": t}) for t in TENANTS}
    async with TenantPoolManager(
        targets, pool=PoolSettings(max_size=1, acquire_timeout=5), default_tenant="acme"
    ) as m:
        yield m


async def tenant_of(conn: Any) -> str:
    return str(await conn.fetchval("SELECT current_setting('app.tenant_id')"))


# -- listener callbacks get the scope's proxy --------------------------------------------------


async def test_listener_callbacks_receive_the_proxy_which_dies_with_the_scope(
    manager: TenantPoolManager,
) -> None:
    got: list[Any] = []
    heard = asyncio.Event()
    logged = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        got.append(conn)
        heard.set()

    def on_log(conn: Any, message: Any) -> None:
        got.append(conn)
        logged.set()

    async with manager.with_connection("acme") as acme:
        await acme.add_listener("edges", on_notify)
        await acme.execute("NOTIFY edges, 'x'")
        acme.add_log_listener(on_log)
        await acme.execute("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
        with anyio.fail_after(10):
            await heard.wait()
            await logged.wait()
        assert got == [acme, acme]
        assert isinstance(got[0], asyncpg.Connection)
    async with manager.with_connection("globex"):
        # The kept callback connection cannot run a query under globex's session.
        with pytest.raises(ConnectionReleased):
            await got[0].fetchval("SELECT current_setting('app.tenant_id')")


async def test_termination_listener_receives_the_proxy(
    manager: TenantPoolManager, pg: PostgresCluster
) -> None:
    got: list[Any] = []
    ended = asyncio.Event()

    def on_end(conn: Any) -> None:
        got.append(conn)
        ended.set()

    async with manager.with_connection("acme") as acme:
        acme.add_termination_listener(on_end)
        pid = acme.get_server_pid()
        admin = await asyncpg.connect(pg.dsn())
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # No query meanwhile: one sent as the socket closes can end in an error path of
        # asyncpg's that skips the termination listeners.
        with anyio.fail_after(10):
            await ended.wait()
        assert got == [acme]
    await drained(manager)


# -- scopes exited out of order ----------------------------------------------------------------


async def test_outer_scope_exited_first_is_not_resurrected(manager: TenantPoolManager) -> None:
    outer = manager.with_connection("acme")
    await outer.__aenter__()
    inner = manager.with_connection("acme")  # reuses the outer scope
    await inner.__aenter__()
    await outer.__aexit__(None, None, None)  # out of order: releases the connection
    assert manager.current_tenant() is None
    await inner.__aexit__(None, None, None)
    assert manager.current_tenant() is None
    await drained(manager)
    # A new scope of the same tenant gets a live connection, not the released one.
    async with manager.with_connection("acme") as conn:
        assert await tenant_of(conn) == "acme"


async def test_exit_stack_misuse_leaves_no_ended_scope_current(pg: PostgresCluster) -> None:
    targets = {t: Target(pg.dsn(), settings={"app.tenant_id": t}) for t in TENANTS}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=2)) as manager:
        stack = AsyncExitStack()
        await stack.enter_async_context(manager.with_connection("acme"))
        async with manager.with_connection("globex"):
            await stack.aclose()  # acme's scope ends while globex's is open
            # globex stays the current one; acme's ended scope does not come back.
            assert manager.current_tenant() == "globex"
        assert manager.current_tenant() is None
        with pytest.raises(NoCurrentConnection):
            manager.current_connection()
        async with manager.with_connection("acme") as conn:
            assert await tenant_of(conn) == "acme"
        await drained(manager)


# -- with_connection needs a tenant --------------------------------------------------------------


@pytest.mark.parametrize("tenant", [None, 42, b"acme", ["acme"]])
async def test_with_connection_refuses_non_strings_even_with_a_default(
    manager: TenantPoolManager, tenant: Any
) -> None:
    with pytest.raises(InvalidTenant):
        async with manager.with_connection(tenant):
            pass
    # Only connection() falls back to the default tenant.
    async with manager.connection() as conn:
        assert await tenant_of(conn) == "acme"


# -- worker threads, and no asyncio at all ---------------------------------------------------------


async def test_a_worker_thread_with_a_copied_context_sees_no_scope(
    manager: TenantPoolManager,
) -> None:
    async with manager.with_connection("acme"):
        # What FastAPI does for a sync dependency: a thread running in a copy of the context.
        def in_thread() -> tuple[str | None, type[BaseException] | None]:
            try:
                manager.current_connection()
            except BaseException as exc:
                return manager.current_tenant(), type(exc)
            return manager.current_tenant(), None

        tenant, raised = await anyio.to_thread.run_sync(in_thread)
    assert tenant is None
    assert raised is NoCurrentConnection


async def test_scopes_outside_asyncio_fail_clearly(manager: TenantPoolManager) -> None:
    """A thread with no event loop stands in for trio: asyncio.current_task() has no loop."""

    def drive(coro: Awaitable[Any]) -> BaseException | None:
        try:
            coro.send(None)  # type: ignore[attr-defined]
        except BaseException as exc:
            return exc
        return None

    def in_thread() -> list[BaseException | None]:
        return [
            drive(manager.with_connection("acme").__aenter__()),
            drive(manager.connection().__aenter__()),
            drive(TenantPoolManager({}).start()),
        ]

    for exc in await anyio.to_thread.run_sync(in_thread):
        assert isinstance(exc, TenantPoolError)
        assert "asyncio" in str(exc)


def test_anyio_is_neither_imported_nor_a_runtime_dependency() -> None:
    root = Path(__file__).resolve().parent.parent
    core = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in core if d.startswith("anyio")]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tenantpool; assert 'anyio' not in sys.modules"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_under_trio_the_manager_says_it_needs_asyncio() -> None:
    trio = pytest.importorskip("trio")

    async def main() -> None:
        manager = TenantPoolManager({})
        with pytest.raises(TenantPoolError, match="asyncio"):
            await manager.start()
        with pytest.raises(TenantPoolError, match="asyncio"):
            async with manager.with_connection("acme"):
                pass

    trio.run(main)


# -- what a connection is ------------------------------------------------------------------------


async def test_a_connection_is_an_asyncpg_connection_with_its_signatures(
    manager: TenantPoolManager,
) -> None:
    async with manager.with_connection("acme") as conn:
        raw = conn._live(False)
        assert isinstance(conn, asyncpg.Connection)
        public = [n for n, f in vars(asyncpg.Connection).items() if n[0] != "_" and callable(f)]
        assert "execute" in public and "add_listener" in public
        for name in public:
            assert inspect.signature(getattr(conn, name)) == inspect.signature(getattr(raw, name))
        assert inspect.iscoroutinefunction(conn.execute)


# -- what init leaves in the session ---------------------------------------------------------------


async def test_what_init_sets_survives_every_reset(pg: PostgresCluster) -> None:
    role = unique_name("init_role")
    admin = await asyncpg.connect(pg.dsn())
    await admin.execute(f"CREATE ROLE {quote_ident(role)} NOLOGIN")
    await admin.execute(f"GRANT {quote_ident(role)} TO CURRENT_USER")

    async def init(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "SET statement_timeout = '5s'; SET default_transaction_read_only = on;"
            f" SET ROLE {quote_ident(role)}"
        )

    targets = {
        "acme": Target(pg.dsn(), settings={"app.tenant_id": "acme"}),
        "globex": Target(pg.dsn(), settings={"app.tenant_id": "globex"}, schema="public"),
    }
    query = (
        "SELECT current_setting('statement_timeout'),"
        " current_setting('default_transaction_read_only'), current_user::text"
    )
    try:
        async with TenantPoolManager(targets, pool=PoolSettings(max_size=1), init=init) as m:
            for tenant in ("acme", "acme", "globex", "acme", "globex"):
                async with m.with_connection(tenant) as conn:
                    # Dirty the session as user code may: the reset must restore init's view.
                    await conn.execute("SET statement_timeout = 0; RESET ROLE")
                await drained(m)
                async with m.with_connection(tenant) as conn:
                    assert tuple(await conn.fetchrow(query)) == ("5s", "on", role)
                    assert await tenant_of(conn) == tenant
                await drained(m)
            assert m.stats().checkouts == 10
            assert m.stats().total == 1  # one backend throughout: resets, not new connections
    finally:
        await admin.execute(f"DROP ROLE {quote_ident(role)}")
        await admin.close()


async def test_a_connection_whose_init_left_a_transaction_open_is_never_handed_out(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def init(conn: asyncpg.Connection) -> None:
        await conn.execute("BEGIN")

    async with TenantPoolManager(
        {"acme": Target(pg.dsn())}, init=init, reconnect_jitter=False
    ) as manager:
        with caplog.at_level(logging.WARNING, "tenantpool"):
            with pytest.raises(TenantPoolError, match="init left a transaction open"):
                async with manager.with_connection("acme"):
                    pass
        assert "init left a transaction open" in caplog.text
        assert manager.stats().total == 0


# -- settings between tenants ----------------------------------------------------------------


async def test_a_setting_another_tenant_defined_reads_null_with_the_documented_idiom(
    pg: PostgresCluster,
) -> None:
    """On a reused backend, a custom setting another tenant defined reads '' where a fresh one
    reads NULL (PostgreSQL cannot undefine it); NULLIF(..., '') reads NULL on both."""
    targets = {
        "acme": Target(pg.dsn(), settings={"app.tenant_id": "acme", "app.other": "x"}),
        "globex": Target(pg.dsn(), settings={"app.tenant_id": "globex"}),
    }
    idiom = "SELECT NULLIF(current_setting('app.other', true), '')"
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=1)) as manager:
        async with manager.with_connection("globex") as fresh:
            assert await fresh.fetchval(idiom) is None
        async with manager.with_connection("acme") as acme:
            assert await acme.fetchval(idiom) == "x"
        async with manager.with_connection("globex") as reused:
            assert await reused.fetchval(idiom) is None


# -- schemas whose tables differ -----------------------------------------------------------------


@pytest.mark.parametrize("state_scope", ["session", "transaction"])
async def test_schema_tenants_with_differing_tables_share_a_pool_inside_transactions(
    pg: PostgresCluster, state_scope: Literal["session", "transaction"]
) -> None:
    schemas = {t: unique_name(t) for t in TENANTS}
    admin = await asyncpg.connect(pg.dsn())
    # A rolling migration half done: globex's table has gained a column, acme's has not.
    await admin.execute(
        f"CREATE SCHEMA {schemas['acme']}; CREATE SCHEMA {schemas['globex']};"
        f" CREATE TABLE {schemas['acme']}.items (id int); INSERT INTO {schemas['acme']}.items"
        f" VALUES (1); CREATE TABLE {schemas['globex']}.items (id int, extra text);"
        f" INSERT INTO {schemas['globex']}.items VALUES (2, 'new')"
    )
    targets = {t: Target(pg.dsn(), schema=schemas[t]) for t in TENANTS}

    async def read(manager: TenantPoolManager, tenant: str) -> list[tuple[Any, ...]]:
        async with manager.with_connection(tenant) as conn, conn.transaction():
            return [tuple(r) for r in await conn.fetch("SELECT * FROM items")]

    try:
        async with TenantPoolManager(
            targets,
            pool=PoolSettings(max_size=1, state_scope=state_scope),
            # Per transaction the cache is off by default: on, it must be split by schema too.
            connect_kwargs={"statement_cache_size": 100},
        ) as manager:
            for _ in range(3):
                assert await read(manager, "acme") == [(1,)]
                assert await read(manager, "globex") == [(2, "new")]
            assert manager.stats().total == 1
    finally:
        await admin.execute(
            f"DROP SCHEMA {schemas['acme']} CASCADE; DROP SCHEMA {schemas['globex']} CASCADE"
        )
        await admin.close()


async def test_statement_caches_per_schema_are_bounded_and_close_what_they_drop(
    pg: PostgresCluster,
) -> None:
    schemas = [unique_name("s") for _ in range(20)]
    admin = await asyncpg.connect(pg.dsn())
    await admin.execute("".join(f"CREATE SCHEMA {s}; CREATE TABLE {s}.t (v int);" for s in schemas))
    targets = {f"t{i}": Target(pg.dsn(), schema=s) for i, s in enumerate(schemas)}
    count = "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
    try:
        async with TenantPoolManager(targets, pool=PoolSettings(max_size=1)) as manager:
            for _ in range(2):
                for tenant in targets:
                    async with manager.with_connection(tenant) as conn:
                        await conn.fetch("SELECT * FROM t")
                        await conn.fetch("SELECT v FROM t")
            async with manager.with_connection("t0") as conn:
                # The 8 most recent schemas' caches, each of this test's 3 statements and the
                # one that switched the session away from it; the 12 older ones' were closed.
                prepared = await conn.fetchval(count)
                assert prepared <= 8 * 4
    finally:
        await admin.execute("".join(f"DROP SCHEMA {s} CASCADE;" for s in schemas))
        await admin.close()
