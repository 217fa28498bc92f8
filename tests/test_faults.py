"""Faults between the manager and its server: a TCP fault proxy, server-side kills, a restart.

Through ``FaultProxy`` (tests/_faults.py) the link black-holes, resets, slows down or refuses
connects, mid-scope and mid-checkout. Nothing may hang past the documented timeouts, nothing
may stay checked out, a user gets a catchable error, and the pool recovers once the link does.
Then the server itself kills backends, and restarts, under load, with the cap sampled on the
server side. Every test runs per session and per transaction where the mode changes the path.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
from _faults import FaultProxy, FaultSampler, server_until
from _postgres import PostgresCluster
from _support import drained, tenant_dsn, until

from tenantpool import (
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolError,
    TenantPoolManager,
    TenantUnavailable,
)

pytestmark = pytest.mark.anyio

STATE_SCOPES = ["session", "transaction"]
TENANTS = ("acme", "globex")
# What a user may get when the link or the server fails under a scope (docs/reliability.md):
# tenantpool's own errors (a connection lost mid-scope is TenantUnavailable), and asyncpg's
# own from a query that failed without losing its connection (its timeout=) or from objects
# made from the connection that talk to asyncpg directly (prepared statements, cursors).
CLEAN_ERRORS: tuple[type[BaseException], ...] = (
    TenantPoolError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    TimeoutError,
    OSError,
)


def settings(state_scope: str, **overrides: Any) -> PoolSettings:
    base: dict[str, Any] = {
        "max_size": 2,
        "acquire_timeout": 3.0,
        "connect_timeout": 1.0,
        "state_scope": state_scope,
    }
    return PoolSettings(**{**base, **overrides})


def targets(dsn: str) -> dict[str, Target]:
    return {t: Target(dsn, settings={"app.tenant_id": t}) for t in TENANTS}


async def own_state(manager: TenantPoolManager, tenant: str) -> None:
    """A checkout of ``tenant`` works and carries exactly its own state."""
    async with manager.with_connection(tenant) as conn:
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") == tenant


async def recovered(manager: TenantPoolManager, limit: float = 30.0) -> int:
    """Wait until every tenant's checkout works again; the failed attempts meanwhile."""
    failures = 0
    with anyio.fail_after(limit):
        for tenant in TENANTS:
            while True:
                try:
                    await own_state(manager, tenant)
                    break
                except CLEAN_ERRORS as exc:
                    failures += 1
                    await anyio.sleep(getattr(exc, "retry_after", 0.02) or 0.02)
    return failures


async def heal(proxy: FaultProxy, manager: TenantPoolManager) -> None:
    """Let the link pass again; wait until every tenant is served and nothing is in use."""
    await proxy.set_mode("pass")
    await recovered(manager)
    await drained(manager)


@pytest.fixture
async def proxy(pg: PostgresCluster, login_dsn: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(login_dsn) as proxy:
        yield proxy


def manager_over(proxy: FaultProxy, state_scope: str, **pool: Any) -> TenantPoolManager:
    return TenantPoolManager(
        targets(proxy.dsn),
        pool=settings(state_scope, **pool),
        reconnect_delay=0.05,
        reconnect_delay_max=0.2,
        close_timeout=2.0,
    )


# --------------------------------------------------------------------------- the proxy


@pytest.mark.parametrize("state_scope", STATE_SCOPES)
@pytest.mark.parametrize("where", ["mid_scope", "new_connection", "switching_tenant"])
async def test_a_black_holed_link_costs_a_timeout_never_a_hang(
    proxy: FaultProxy, state_scope: str, where: str
) -> None:
    async with manager_over(proxy, state_scope, max_size=1) as manager:
        if where != "new_connection":
            await own_state(manager, "acme")
        await proxy.set_mode("blackhole")
        with anyio.fail_after(30):  # a ceiling far past every timeout involved
            with pytest.raises(CLEAN_ERRORS):
                tenant = "globex" if where == "switching_tenant" else "acme"
                async with manager.with_connection(tenant) as conn:
                    # A query has no timeout of its own unless given one: asyncpg's.
                    await conn.fetchval("SELECT 1", timeout=0.5)
            await drained(manager, limit=30)
        assert manager.stats().in_use == 0
        await heal(proxy, manager)


@pytest.mark.parametrize("state_scope", STATE_SCOPES)
async def test_a_checkout_waiting_behind_a_black_holed_holder_times_out_and_nothing_leaks(
    proxy: FaultProxy, state_scope: str
) -> None:
    async with manager_over(proxy, state_scope, max_size=1, acquire_timeout=0.5) as manager:
        await own_state(manager, "acme")
        holding = anyio.Event()
        errors: list[BaseException] = []

        async def holder() -> None:
            try:
                async with manager.with_connection("acme") as conn:
                    holding.set()
                    await conn.fetchval("SELECT pg_sleep(0.2)", timeout=2)
            except CLEAN_ERRORS as exc:
                errors.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await holding.wait()
                await proxy.set_mode("blackhole")
                with pytest.raises(PoolTimeout):
                    async with manager.with_connection("globex"):
                        pass
        assert len(errors) == 1
        await heal(proxy, manager)


@pytest.mark.parametrize("state_scope", STATE_SCOPES)
async def test_a_reset_mid_query_is_a_catchable_error_and_the_pool_recovers(
    pg: PostgresCluster, login: tuple[str, str], proxy: FaultProxy, state_scope: str
) -> None:
    async with manager_over(proxy, state_scope) as manager:
        await own_state(manager, "acme")
        errors: list[BaseException] = []

        async def long_query() -> None:
            try:
                async with manager.with_connection("acme") as conn:
                    await conn.execute("SELECT pg_sleep(3)")
            except CLEAN_ERRORS as exc:
                errors.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_query)
                await server_until(
                    lambda: pg.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
                        " AND query LIKE 'SELECT pg_sleep%' AND state = 'active'",
                        login[0],
                    )
                )
                await proxy.set_mode("reset")
        assert len(errors) == 1, errors
        assert proxy.resets >= 1
        await drained(manager)
        await heal(proxy, manager)


@pytest.mark.parametrize("state_scope", STATE_SCOPES)
async def test_a_slow_link_serves_every_checkout_its_own_state(
    proxy: FaultProxy, state_scope: str
) -> None:
    proxy.delay = 0.005
    async with manager_over(proxy, state_scope, max_size=2, acquire_timeout=30) as manager:
        await proxy.set_mode("slow")
        rng = random.Random(14)

        async def worker(n: int) -> None:
            for _ in range(5):
                await own_state(manager, rng.choice(TENANTS))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(6):
                    tg.start_soon(worker, n)
        assert manager.stats().checkouts == 30
        await drained(manager)


async def test_refused_connects_back_off_with_tenant_unavailable_then_recover(
    proxy: FaultProxy,
) -> None:
    async with manager_over(proxy, "session") as manager:
        await proxy.set_mode("refuse")
        with anyio.fail_after(30):
            with pytest.raises(TenantUnavailable) as first:
                await own_state(manager, "acme")
            assert first.value.retry_after > 0
            # Backing off: turned away at once, without another connect.
            errors_before = manager.stats().connect_errors
            with pytest.raises(TenantUnavailable):
                await own_state(manager, "acme")
            assert manager.stats().connect_errors == errors_before
        assert manager.stats().in_use == 0
        await heal(proxy, manager)


# --------------------------------------------------------------------------- server side


class Load:
    """Workers checking out both tenants in a loop, counting what they got."""

    def __init__(self, manager: TenantPoolManager, workers: int = 8) -> None:
        self.manager = manager
        self.workers = workers
        self.ok = 0
        self.errors: list[BaseException] = []
        self._stop = anyio.Event()

    async def progressed(self, checkouts: int, limit: float = 60.0) -> None:
        target = self.ok + checkouts
        await until(lambda: self.ok >= target, limit)

    async def _worker(self, n: int) -> None:
        rng = random.Random(n)
        while not self._stop.is_set():
            try:
                await own_state(self.manager, rng.choice(TENANTS))
                self.ok += 1
            except CLEAN_ERRORS as exc:
                self.errors.append(exc)
                await anyio.sleep(0.01)

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        for n in range(self.workers):
            tg.start_soon(self._worker, n)

    def stop(self) -> None:
        self._stop.set()


@pytest.mark.parametrize("state_scope", STATE_SCOPES)
async def test_terminated_backends_under_load_hold_the_cap_and_leave_nothing_checked_out(
    pg: PostgresCluster, login: tuple[str, str], state_scope: str
) -> None:
    cap, rounds = 4, 5
    dsn = pg.dsn(*login)
    resolver = {t: Target(tenant_dsn(dsn, t), settings={"app.tenant_id": t}) for t in TENANTS}
    killed = 0
    with FaultSampler(pg.superuser_dsn, login[0]) as sampler:
        async with TenantPoolManager(
            resolver,
            max_total_connections=cap,
            pool=settings(state_scope, max_size=3, acquire_timeout=10),
            reconnect_delay=0.02,
            reconnect_delay_max=0.1,
        ) as manager:
            load = Load(manager)
            async with anyio.create_task_group() as tg:
                await load.run(tg)
                for _ in range(rounds):
                    await load.progressed(30)
                    pids = await pg.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE usename = $1", login[0]
                    )
                    sampler.excluded.update(r["pid"] for r in pids)
                    killed += await pg.fetchval(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                        " FROM unnest($1::int[]) AS pid",
                        [r["pid"] for r in pids],
                    )
                await load.progressed(30)
                load.stop()
            await drained(manager, limit=30)
            await recovered(manager)
            stats = manager.stats()
            assert stats.in_use == 0 and stats.total <= cap
    assert killed >= rounds
    assert sampler.peak <= cap, sampler.peak
    # A connection the server killed, idle or under a query, is tenantpool's error to report.
    assert all(isinstance(e, TenantPoolError) for e in load.errors), load.errors
    kinds = Counter(type(e).__name__ for e in load.errors)
    print(
        f"\nterminations ({state_scope}): {load.ok} checkouts, {killed} backends killed,"
        f" {len(load.errors)} errors {dict(kinds)}, server peak {sampler.peak} of cap {cap}"
    )


async def test_a_restart_under_load_holds_the_cap_and_every_tenant_is_served_after(
    restartable_pg: PostgresCluster, login: tuple[str, str]
) -> None:
    pg, cap = restartable_pg, 4
    dsn = pg.dsn(*login)
    resolver = {t: Target(tenant_dsn(dsn, t), settings={"app.tenant_id": t}) for t in TENANTS}
    with FaultSampler(pg.superuser_dsn, login[0]) as sampler:
        async with TenantPoolManager(
            resolver,
            max_total_connections=cap,
            pool=settings("session", max_size=3, acquire_timeout=10),
            reconnect_delay=0.05,
            reconnect_delay_max=0.5,
        ) as manager:
            load = Load(manager)
            async with anyio.create_task_group() as tg:
                await load.run(tg)
                await load.progressed(50)
                before = load.ok
                await anyio.to_thread.run_sync(pg.restart)
                await load.progressed(50)
                load.stop()
            await drained(manager, limit=30)
            await recovered(manager)
            assert manager.stats().in_use == 0
    assert sampler.peak <= cap, sampler.peak
    assert all(isinstance(e, TenantPoolError) for e in load.errors), load.errors
    print(
        f"\nrestart: {load.ok} checkouts ({load.ok - before} after the restart began),"
        f" {len(load.errors)} errors {dict(Counter(type(e).__name__ for e in load.errors))},"
        f" server peak {sampler.peak} of cap {cap}"
    )
