"""Issue 14's seven faults, each reproduced against the real server."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import Awaitable

import anyio
import asyncpg
import asyncpg.transaction
import pytest
from _faults import FaultProxy, server_until
from _postgres import PostgresCluster
from _support import drained, until

from tenantpool import (
    ConnectionReleased,
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolManager,
    TenantUnavailable,
)
from tenantpool._liveness import Watch
from tenantpool._scope import scopes

pytestmark = pytest.mark.anyio

ONE = PoolSettings(max_size=1, acquire_timeout=10.0)


async def backends(pg: PostgresCluster, role: str, state: str | None = None) -> int:
    count: int = await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND ($2::text IS NULL"
        " OR state = $2)",
        role,
        state,
    )
    return count


# --------------------------------------------------------------------------- 1


@pytest.mark.parametrize("wipe", ["DEALLOCATE ALL", "DISCARD ALL"])
async def test_a_wipe_of_prepared_statements_in_the_first_scope_does_not_poison_the_connection(
    pg: PostgresCluster, wipe: str
) -> None:
    async with TenantPoolManager({"a": Target(pg.dsn())}, pool=ONE) as manager:
        async with manager.with_connection("a") as conn:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.execute(wipe)
        for _ in range(3):
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
        await drained(manager)


# --------------------------------------------------------------------------- 2


async def test_close_with_scopes_mid_query_leaves_no_query_running_on_the_server(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    role = login[0]
    holders = 4
    started = anyio.Event()
    running: list[int] = []
    manager = TenantPoolManager(
        {"a": Target(pg.dsn(*login))}, pool=PoolSettings(max_size=holders), close_timeout=0.2
    )
    await manager.start()

    async def hold() -> None:
        # close() terminates the connection under the query: a connection lost mid-scope.
        with pytest.raises(TenantUnavailable):
            async with manager.with_connection("a") as conn:
                running.append(conn.get_server_pid())
                if len(running) == holders:
                    started.set()
                await conn.execute("SELECT pg_sleep(120)")

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(holders):
                tg.start_soon(hold)
            with anyio.fail_after(30):
                await started.wait()
            await server_until(lambda: at_least(backends(pg, role, "active"), holders))
            await manager.close()
        # The server notices a terminated socket only when it next writes: nothing cancels
        # the query but tenantpool.
        await server_until(lambda: at_most(backends(pg, role, "active"), 0), limit=5)
    finally:
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )


async def at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def at_most(count: Awaitable[int], n: int) -> bool:
    return await count <= n


async def gone(count: Awaitable[int]) -> bool:
    return await count == 0


# --------------------------------------------------------------------------- 3


async def test_two_close_calls_at_once_both_return_when_the_pool_is_drained(
    pg: PostgresCluster,
) -> None:
    # close_timeout is far above the ceilings below: a caller that waits for it fails them.
    manager = TenantPoolManager({"a": Target(pg.dsn())}, pool=ONE, close_timeout=120)
    await manager.start()
    async with manager.with_connection("a") as conn:
        await conn.execute("SET work_mem = '8MB'")  # dirty: a reset follows the release
    closes = [asyncio.ensure_future(manager.close()) for _ in range(2)]
    try:
        with anyio.fail_after(20):
            await asyncio.wait(closes, return_when=asyncio.FIRST_COMPLETED)
        with anyio.fail_after(5):
            await asyncio.gather(*closes)
    finally:
        for close in closes:
            close.cancel()
        await asyncio.gather(*closes, return_exceptions=True)


# --------------------------------------------------------------------------- 4


async def test_a_scope_exited_from_another_task_is_no_longer_current_in_the_opening_task(
    pg: PostgresCluster,
) -> None:
    async with TenantPoolManager({"b": Target(pg.dsn())}, pool=ONE) as manager:
        cm = manager.with_connection("b")
        first = await cm.__aenter__()
        await asyncio.create_task(cm.__aexit__(None, None, None))
        assert manager.current_tenant() is None
        with pytest.raises(ConnectionReleased):
            await first.fetchval("SELECT 1")
        async with manager.with_connection("b") as conn:
            assert conn is not first
            assert await conn.fetchval("SELECT 1") == 1
        await drained(manager)


# --------------------------------------------------------------------------- 5


async def test_an_ended_scope_keeps_neither_its_task_nor_its_connection_reachable(
    pg: PostgresCluster,
) -> None:
    kept: list[contextvars.Context] = []

    async def fail() -> None:
        async with manager.with_connection("a") as conn:
            await conn.fetchval("SELECT 1")
            # What asyncpg's statement-cache timer does: a copy of the context, kept.
            kept.append(contextvars.copy_context())
            raise RuntimeError("the request failed")

    async with TenantPoolManager({"a": Target(pg.dsn())}, pool=ONE) as manager:
        task = asyncio.create_task(fail())
        with pytest.raises(RuntimeError):
            await task
        task_ref = weakref.ref(task)
        del task
        # The loop lets go of the task once its done callbacks have run: a few turns.
        await until(lambda: gc.collect() >= 0 and task_ref() is None)
        (scope,) = kept[0][scopes]
        assert scope.task is None and scope.pool is None
        assert scope.proxy._raw is None and scope.proxy._conn is None
        await drained(manager)


# --------------------------------------------------------------------------- 6


async def kill(pg: PostgresCluster, pid: int) -> None:
    """Terminate backend ``pid`` and wait until the server has let it go."""
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
    await server_until(
        lambda: gone(pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))
    )


async def kill_when_active(pg: PostgresCluster, pid: int) -> None:
    await server_until(
        lambda: pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid
        )
    )
    await kill(pg, pid)


async def test_a_connection_the_server_killed_while_idle_is_not_handed_out(
    pg: PostgresCluster,
) -> None:
    async with FaultProxy(pg.dsn()) as proxy:
        async with TenantPoolManager({"a": Target(proxy.dsn)}, pool=ONE) as manager:
            async with manager.with_connection("a") as conn:
                pid = conn.get_server_pid()
            await drained(manager)
            # The client gets the server's FATAL but not its EOF: the idle connection is
            # not closed, and asyncpg's protocol waits for a ReadyForQuery that never comes.
            proxy.hold_eof = True
            await kill(pg, pid)
            try:
                async with manager.with_connection("a") as conn:
                    assert await conn.fetchval("SELECT 1") == 1
                    assert conn.get_server_pid() != pid
                # The dead one was dropped at once (its slot too: max_size=1).
                assert manager.stats().total == 1
            finally:
                proxy.hold_eof = False
                proxy.reset_all()


@pytest.mark.parametrize("state_scope", ["session", "transaction"])
@pytest.mark.parametrize("when", ["between_queries", "mid_query"])
async def test_a_connection_lost_mid_scope_costs_tenant_unavailable(
    pg: PostgresCluster, state_scope: str, when: str
) -> None:
    settings = PoolSettings(max_size=1, state_scope=state_scope)  # type: ignore[arg-type]
    killing: list[asyncio.Future[None]] = []
    async with FaultProxy(pg.dsn()) as proxy:
        async with TenantPoolManager({"a": Target(proxy.dsn)}, pool=settings) as manager:
            # Between queries the FATAL arrives while the scope is idle and its EOF is held
            # (asyncpg's InternalClientError once); mid-query the link closes under it.
            proxy.hold_eof = when == "between_queries"
            try:
                with anyio.fail_after(30):
                    with pytest.raises(TenantUnavailable, match="lost mid-scope") as info:
                        async with manager.with_connection("a") as conn:
                            pid = conn.get_server_pid()
                            if when == "between_queries":
                                await kill(pg, pid)
                                await conn.fetchval("SELECT 1")
                            else:
                                killing.append(asyncio.ensure_future(kill_when_active(pg, pid)))
                                await conn.execute("SELECT pg_sleep(30)")
                    await asyncio.gather(*killing)
            finally:
                proxy.hold_eof = False
                proxy.reset_all()
            assert info.value.retry_after > 0
            # The error asyncpg raised comes along: a closed connection's (the server's FATAL
            # ended it between queries), or the loss under a running query.
            cause = {
                "between_queries": asyncpg.InterfaceError,
                "mid_query": asyncpg.ConnectionDoesNotExistError,
            }[when]
            assert isinstance(info.value.__cause__, cause), info.value.__cause__
            assert manager.stats().in_use == 0
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
            await drained(manager)


@pytest.mark.parametrize("at", ["create", "begin", "commit"])
async def test_a_connection_lost_under_a_transaction_block_costs_tenant_unavailable(
    pg: PostgresCluster, at: str
) -> None:
    async with TenantPoolManager({"a": Target(pg.dsn())}, pool=ONE) as manager:
        with pytest.raises(TenantUnavailable, match="lost mid-scope") as info:
            async with manager.with_connection("a") as conn:
                if at == "create":
                    await kill(pg, conn.get_server_pid())
                    await until(lambda: conn.is_closed())
                block = conn.transaction()
                assert isinstance(block, asyncpg.transaction.Transaction)
                if at == "begin":
                    await kill(pg, conn.get_server_pid())
                    await until(lambda: conn.is_closed())
                async with block:
                    await kill(pg, conn.get_server_pid())
                    # The loop reads the FATAL and the EOF: the commit meets a closed connection.
                    await until(lambda: conn.is_closed())
        assert isinstance(info.value.__cause__, asyncpg.InterfaceError), info.value.__cause__
        assert manager.stats().in_use == 0
        async with manager.with_connection("a") as conn, conn.transaction():
            assert await conn.fetchval("SELECT 1") == 1


class Recorder(asyncio.Protocol, asyncio.Transport):
    """Stands in for asyncpg's protocol and for the transport on either side of a Watch."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []
        self.lost: list[Exception | None] = []
        self.aborted = False

    def data_received(self, data: bytes) -> None:
        self.got.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def abort(self) -> None:
        self.aborted = True


def test_the_watch_ends_a_connection_on_a_read_that_ends_with_a_fatal() -> None:
    body = b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00"
    body += b"\x00"  # the message's end
    fatal = b"E" + (len(body) + 4).to_bytes(4, "big") + body
    ready = b"Z\x00\x00\x00\x05I"
    rows = b"D\x00\x00\x00\x0e\x00\x01\x00\x00\x00\x04\x00\x00\x00\x07" * 10_000
    row_with_fatal_bytes = b"D\x00\x00\x00\x1a\x00\x01\x00\x00\x00\x10" + fatal[4:20]
    for reads, ended in [
        ([ready], False),
        ([fatal], True),
        ([rows + ready + fatal], True),  # killed right after a large result
        ([rows, ready, fatal], True),
        ([row_with_fatal_bytes + ready], False),  # the same bytes, not ending the read
        ([ready + row_with_fatal_bytes], False),  # ending it, but no message of that length
    ]:
        protocol, transport = Recorder(), Recorder()
        watch = Watch(protocol, transport)
        for data in reads:
            watch.data_received(data)
        assert b"".join(protocol.got) == b"".join(reads)  # every byte reaches asyncpg
        assert protocol.lost == ([None] if ended else [])
        assert transport.aborted is ended
        watch.connection_lost(None)  # the transport's own report, after its abort
        assert protocol.lost == [None]


async def test_a_lost_commit_at_the_end_of_a_transaction_scope_costs_tenant_unavailable(
    pg: PostgresCluster,
) -> None:
    settings = PoolSettings(max_size=1, state_scope="transaction")
    async with TenantPoolManager({"a": Target(pg.dsn())}, pool=settings) as manager:
        with pytest.raises(TenantUnavailable, match="lost mid-scope") as info:
            async with manager.with_connection("a") as conn:
                await conn.fetchval("SELECT 1")
                await kill(pg, conn.get_server_pid())
                # The loop reads the FATAL and the EOF: the commit meets a closed connection.
                await until(lambda: conn.is_closed())
        assert isinstance(info.value.__cause__, asyncpg.InterfaceError), info.value.__cause__
        assert manager.stats().in_use == 0
        async with manager.with_connection("a") as conn:
            assert await conn.fetchval("SELECT 1") == 1


# --------------------------------------------------------------------------- 7


@pytest.mark.parametrize("ttl", [0.0, 60.0])
async def test_a_hanging_resolver_costs_the_checkout_its_acquire_timeout(
    pg: PostgresCluster, ttl: float
) -> None:
    answer = anyio.Event()
    calls = 0

    async def resolver(tenant: str) -> Target:
        nonlocal calls
        calls += 1
        await answer.wait()
        return Target(pg.dsn())

    settings = PoolSettings(max_size=1, acquire_timeout=0.2)
    async with TenantPoolManager(resolver, pool=settings, resolver_ttl=ttl) as manager:
        with anyio.fail_after(30):
            with pytest.raises(PoolTimeout, match="resolver") as info:
                async with manager.with_connection("a"):
                    pass
        assert info.value.retry_after > 0
        assert manager.stats().in_use == 0
        assert manager.stats().timeouts == 1  # counted as any PoolTimeout is
        answer.set()
        async with manager.with_connection("a") as conn:
            assert await conn.fetchval("SELECT 1") == 1
        # With a cache, the lookup the first caller gave up on went on and served the second.
        assert calls == (2 if ttl == 0 else 1)
        await drained(manager)


async def test_a_resolver_asked_on_every_checkout_serves_quota_checkouts(
    pg: PostgresCluster,
) -> None:
    # The resolver's time counts against acquire_timeout, the quota's wait included.
    targets = {"a": Target(pg.dsn(), max_in_use=1)}

    async def resolver(tenant: str) -> Target | None:
        await asyncio.sleep(0)
        return targets.get(tenant)

    async with TenantPoolManager(resolver, pool=ONE, resolver_ttl=0) as manager:
        for _ in range(3):
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
        assert manager.stats().checkouts == 3
        await drained(manager)
