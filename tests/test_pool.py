"""Per-target pools: lazy single-flight creation, FIFO waiters, timeouts, errors, close, stats."""

from __future__ import annotations

import asyncio
import time

import anyio
import anyio.lowlevel
import pytest
from _postgres import PostgresCluster, unique_name
from _support import drained, server_connections, until

from tenantpool import (
    ManagerClosed,
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolError,
    TenantPoolManager,
    TenantUnavailable,
    _session,
)

pytestmark = pytest.mark.anyio


def shared(dsn: str, *tenants: str, pool: PoolSettings | None = None) -> dict[str, Target]:
    return {t: Target(dsn, settings={"app.tenant_id": t}, pool=pool) for t in tenants}


@pytest.fixture
async def login(pg: PostgresCluster) -> str:
    """A fresh login role, so server-side connection counts see only this test's pools."""
    name = unique_name("login")
    await pg.create_role(name, password="pw-" + name)
    return name


async def test_pools_are_created_lazily_and_once(pg: PostgresCluster, login: str) -> None:
    dsn = pg.dsn(user=login, password="pw-" + login)
    resolved: list[str] = []

    async def resolver(tenant: str) -> Target | None:
        resolved.append(tenant)
        await anyio.lowlevel.checkpoint()  # let concurrent first checkouts interleave
        return Target(dsn, settings={"app.tenant_id": tenant})

    settings = PoolSettings(max_size=5, acquire_timeout=20)
    # No resolver cache: every first checkout resolves, and they interleave.
    async with TenantPoolManager(resolver, pool=settings, resolver_ttl=0) as manager:
        assert manager.stats().pools == {}
        assert await server_connections(pg, login) == 0

        async def checkout() -> None:
            async with manager.with_connection("acme") as conn:
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == "acme"

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(checkout)
        stats = manager.stats()
        assert list(stats.pools) == [f"postgresql://{login}@127.0.0.1:{pg.port}/postgres"]
        assert 1 <= stats.total <= 5
        assert len(resolved) == 100
        assert await server_connections(pg, login) == stats.total


async def test_shared_dsn_shares_a_pool_and_other_dsns_get_their_own(
    pg: PostgresCluster, login: str
) -> None:
    other_db = unique_name("db")
    await pg.create_database(other_db)
    password = "pw-" + login
    targets = {
        **shared(pg.dsn(user=login, password=password), "acme", "globex"),
        "initech": Target(pg.dsn(user=login, password=password, database=other_db)),
        "hooli": Target(pg.dsn()),
    }
    async with TenantPoolManager(targets) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant) as conn:
                await conn.fetchval("SELECT 1")
        pools = manager.stats().pools
        assert len(pools) == 3
        assert f"postgresql://{login}@127.0.0.1:{pg.port}/postgres" in pools
        for name in pools:
            assert password not in name and pg.superuser_password not in name
    await pg.drop_database(other_db)


async def test_dsns_differing_only_by_password_get_distinct_names(pg: PostgresCluster) -> None:
    targets = {
        "acme": Target(pg.dsn()),
        "globex": Target(pg.dsn().replace("@", "@", 1) + "?application_name=x"),
        "initech": Target(pg.dsn(password="wrong")),
    }
    async with TenantPoolManager(targets) as manager:
        for tenant in ("acme", "globex"):
            async with manager.with_connection(tenant):
                pass
        with pytest.raises(TenantUnavailable):
            async with manager.with_connection("initech"):
                pass
        names = list(manager.stats().pools)
        assert len(names) == len(set(names)) == 3
        assert f"postgresql://postgres@127.0.0.1:{pg.port}/postgres#2" in names


async def test_waiters_are_served_first_come_first_served(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1, acquire_timeout=10)
    tenants = [f"t{i}" for i in range(6)]
    async with TenantPoolManager(shared(pg.dsn(), *tenants), pool=settings) as manager:
        served: list[str] = []
        holding, release = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with manager.with_connection("t0") as conn:
                await conn.fetchval("SELECT 1")
                holding.set()
                await release.wait()

        async def wait_for(tenant: str) -> None:
            async with manager.with_connection(tenant) as conn:
                served.append(tenant)
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == tenant

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            for queued, tenant in enumerate(tenants[1:], start=1):
                tg.start_soon(wait_for, tenant)
                with anyio.fail_after(5):  # each waiter is queued before the next one starts
                    while manager.stats().waiting < queued:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
            assert served == []
            release.set()
        assert served == tenants[1:]
        await drained(manager)


async def test_acquire_timeout_raises_pool_timeout(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1, acquire_timeout=0.2)
    async with TenantPoolManager(shared(pg.dsn(), "acme", "globex"), pool=settings) as manager:
        async with manager.with_connection("acme"):
            started = time.monotonic()
            with pytest.raises(PoolTimeout) as info:
                async with manager.with_connection("globex"):
                    pass
            elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert info.value.retry_after > 0
        assert "after 0.20 sec" in str(info.value)
        assert 0.15 < elapsed < 30  # not early; the ceiling only catches a hang
        assert manager.stats().waiting == 0
        async with manager.with_connection("globex") as conn:
            assert await conn.fetchval("SELECT 1") == 1


async def test_each_waiter_times_out_at_its_own_deadline(pg: PostgresCluster) -> None:
    """One timer per pool serves every waiter's deadline, in turn, none early, none late."""
    settings = PoolSettings(max_size=1, acquire_timeout=0.3)
    async with TenantPoolManager(shared(pg.dsn(), "acme"), pool=settings) as manager:
        timed_out: dict[int, float] = {}

        async def wait(i: int, started: float) -> None:
            with pytest.raises(PoolTimeout):
                async with manager.with_connection("acme"):
                    pass
            timed_out[i] = time.monotonic() - started

        async with manager.with_connection("acme"):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(wait, i, time.monotonic())
                    await anyio.sleep(0.1)
        for i in range(3):
            # None early; the ceiling only says none waited for another's deadline or forever
            # (how late a loaded machine wakes a timer is the benchmarks' business).
            assert 0.29 <= timed_out[i] < 0.3 + 10, timed_out
        assert manager.stats().waiting == 0
        assert manager.stats().timeouts == 3


async def test_connect_errors_are_tenant_unavailable_without_secrets(
    pg: PostgresCluster, login: str
) -> None:
    secret = "Sup3r-Secret-" + login
    with anyio.fail_after(10):
        async with TenantPoolManager(
            {
                "badpass": Target(pg.dsn(user=login, password=secret)),
                "nodb": Target(pg.dsn(database=unique_name("missing"))),
                "down": Target(f"postgresql://x:{secret}@127.0.0.1:1/app"),
            },
            pool=PoolSettings(connect_timeout=2),
        ) as manager:
            for tenant in ("badpass", "nodb", "down"):
                with pytest.raises(TenantUnavailable) as info:
                    async with manager.with_connection(tenant):
                        pass
                error = info.value
                assert error.retry_after > 0
                assert secret not in str(error) and secret not in repr(error)
                assert pg.superuser_password not in str(error)
                assert "cannot connect to" in str(error)
            assert secret not in repr(manager) and secret not in repr(manager.stats())
            assert manager.stats().total == 0


async def test_idle_connections_are_reused_most_recent_first(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=3)
    async with TenantPoolManager(shared(pg.dsn(), "acme"), pool=settings) as manager:
        pids: list[int] = []
        gate = anyio.Event()

        async def hold() -> None:
            async with manager.with_connection("acme") as conn:
                pids.append(conn.get_server_pid())
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(hold)
            with anyio.fail_after(5):
                while len(pids) < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            gate.set()
        await drained(manager)
        async with manager.with_connection("acme") as conn:
            first = await conn.fetchval("SELECT pg_backend_pid()")
        await drained(manager)  # the reset done, the most recently released comes back first
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() == first
        # A scope that only read the pid did not dirty the session: no reset, straight back.
        assert manager.stats().pools[next(iter(manager.stats().pools))].releasing == 0
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() == first
        assert manager.stats().total == 3


async def test_close_is_bounded_when_a_scope_never_ends(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"), close_timeout=0.3)
    await manager.start()
    holding = anyio.Event()
    errors: list[BaseException] = []

    async def stuck() -> None:
        async with manager.with_connection("acme") as conn:
            holding.set()
            try:
                await conn.fetchval("SELECT pg_sleep(60)")
            except Exception as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stuck)
        await holding.wait()
        started = time.monotonic()
        await manager.close()
        assert time.monotonic() - started < 3
    # Its connection was cut off under the query: a connection lost mid-scope.
    assert errors and isinstance(errors[0], TenantUnavailable), errors
    assert manager.stats().total == 0
    with pytest.raises(ManagerClosed):
        async with manager.with_connection("globex"):
            pass


async def test_close_fails_queued_waiters(pg: PostgresCluster) -> None:
    settings = PoolSettings(max_size=1, acquire_timeout=30)
    manager = TenantPoolManager(shared(pg.dsn(), "acme"), pool=settings, close_timeout=0.2)
    await manager.start()
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            async with manager.with_connection("acme"):
                pass
        except BaseException as exc:
            outcome.append(exc)

    async with manager.with_connection("acme"):
        task = asyncio.create_task(waiter())
        with anyio.fail_after(5):
            while manager.stats().waiting < 1:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        await manager.close()
    await task
    assert len(outcome) == 1 and isinstance(outcome[0], ManagerClosed)


async def test_stats_and_repr(pg: PostgresCluster) -> None:
    async with TenantPoolManager(
        shared(pg.dsn(), "acme", "globex"), pool=PoolSettings(min_size=0, max_size=4)
    ) as manager:
        async with manager.with_connection("acme"), manager.with_connection("globex"):
            stats = manager.stats()
            assert (stats.total, stats.in_use, stats.idle, stats.waiting) == (2, 2, 0, 0)
            assert stats.max_total is None
            (pool,) = stats.pools.values()
            assert (pool.size, pool.in_use, pool.min_size, pool.max_size) == (2, 2, 0, 4)
            assert "2 active" in repr(manager)
            assert pg.superuser_password not in repr(manager)
        await drained(manager)
        stats = manager.stats()
        assert (stats.total, stats.in_use, stats.idle) == (2, 0, 2)
        assert pg.superuser_password not in repr(manager._pools)
        assert pg.superuser_password not in repr(vars(manager))


async def test_counters_and_the_wait_histogram(pg: PostgresCluster) -> None:
    async with TenantPoolManager(
        shared(pg.dsn(), "acme", "globex"), pool=PoolSettings(max_size=1)
    ) as manager:
        async with manager.with_connection("acme"):  # opens: a wait
            pass
        await drained(manager)
        for _ in range(3):  # idle at hand: no wait
            async with manager.with_connection("acme"):
                async with manager.with_connection("acme"):  # reused: not a checkout
                    pass
            await drained(manager)
        stats = manager.stats()
        assert (stats.checkouts, stats.timeouts, stats.steals, stats.connect_errors) == (4, 0, 0, 0)
        (pool,) = stats.pools.values()
        assert pool.checkouts == 4 and not pool.backing_off and pool.retry_after == 0.0
        waits = stats.wait_time
        assert waits.count == 4 and waits.sum > 0
        counts = [n for _, n in waits.buckets]
        assert counts == sorted(counts) and counts[0] >= 3 and counts[-1] <= 4
        assert [bound for bound, _ in waits.buckets] == sorted(bound for bound, _ in waits.buckets)


async def test_type_codec_changes_close_the_connection_at_release(pg: PostgresCluster) -> None:
    async with TenantPoolManager(
        shared(pg.dsn(), "acme"), pool=PoolSettings(max_size=1)
    ) as manager:
        async with manager.with_connection("acme") as conn:
            pid = conn.get_server_pid()
            await conn.set_type_codec(
                "int4",
                encoder=str,
                decoder=lambda v: f"int:{v}",
                schema="pg_catalog",
                format="text",
            )
            assert await conn.fetchval("SELECT 1::int4") == "int:1"
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() != pid
            assert await conn.fetchval("SELECT 1::int4") == 1


async def test_idle_connections_dead_after_a_restart_are_replaced(
    restartable_pg: PostgresCluster,
) -> None:
    pg = restartable_pg
    async with TenantPoolManager(
        shared(pg.dsn(), "acme", "globex"), pool=PoolSettings(max_size=2)
    ) as manager:
        async with manager.with_connection("acme"), manager.with_connection("globex"):
            pass
        pg.restart()
        # The loop learns of the closed sockets when it next reads them: wait for that, as a
        # checkout a moment later would find (before it, no client could tell them dead).
        (pool,) = manager._pools.values()
        await until(lambda: all(c.raw.is_closed() for c in pool._dispatch.idle), 30)
        for tenant in ("acme", "globex", "acme"):
            async with manager.with_connection(tenant) as conn:
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == tenant
        await drained(manager)


async def held_then_waited(
    manager: TenantPoolManager, holder: str, waiter: str
) -> tuple[int, int | BaseException]:
    """``holder`` dirties the only connection while ``waiter`` queues for it; the two pids
    (or what the waiter's checkout raised)."""
    got: list[int | BaseException] = []

    async def wait() -> None:
        try:
            async with manager.with_connection(waiter) as conn:
                got.append(conn.get_server_pid())
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == waiter
        except TenantPoolError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        async with manager.with_connection(holder) as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET work_mem = '5MB'")
            tg.start_soon(wait)
            while manager.stats().waiting == 0:  # noqa: ASYNC110
                await anyio.sleep(0.001)
    return pid, got[0]


async def test_a_connection_is_reset_straight_to_its_waiters_state(
    pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset after a release applies the first waiter's tenant, not the old one's: the
    waiter's checkout then needs no round trip to switch tenants."""
    switches: list[object] = []
    real = _session.apply_state

    async def counting(*args: object, **kwargs: object) -> None:
        switches.append(args[2])
        await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_session, "apply_state", counting)
    settings = PoolSettings(max_size=1)
    async with TenantPoolManager(shared(pg.dsn(), "acme", "globex"), pool=settings) as manager:
        async with manager.with_connection("acme"):
            pass
        switches.clear()
        pid, waited = await held_then_waited(manager, "acme", "globex")
        assert waited == pid  # the same backend, carrying globex's state, reset of acme's
        assert switches == []
        await drained(manager)


async def test_a_waiter_whose_state_fails_does_not_cost_the_connection(
    pg: PostgresCluster,
) -> None:
    targets = shared(pg.dsn(), "acme")
    targets["norole"] = Target(pg.dsn(), role=unique_name("missing_role"))
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=1)) as manager:
        pid, waited = await held_then_waited(manager, "acme", "norole")
        assert isinstance(waited, TenantPoolError)
        assert "does not exist" in str(waited)
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() == pid  # reset clean, not closed
        await drained(manager)
