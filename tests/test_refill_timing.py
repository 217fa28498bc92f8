"""Refill after an outage runs when the backoff allows the next attempt, not on the next tick.

Every manager here has a reap_interval of 30 s, far longer than any test: whatever reconnects
is the pool's own refill timer, never the background task.
"""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import pytest
from _postgres import PostgresCluster
from _support import FakeServer, drained, tenant_dsn, until

from tenantpool import PoolSettings, Target, TenantPoolManager, TenantUnavailable
from tenantpool._pool import Pool

pytestmark = pytest.mark.anyio

NEVER_TICKS = 30.0


async def knock(manager: TenantPoolManager, tenant: str) -> None:
    with pytest.raises(TenantUnavailable):
        async with manager.with_connection(tenant):
            pass


def only_pool(manager: TenantPoolManager) -> Pool:
    (pool,) = manager._pools.values()
    return pool


async def test_a_pool_below_min_size_retries_on_its_own_timer_until_closed() -> None:
    async with FakeServer() as down:
        manager = TenantPoolManager(
            {"down": Target(down.dsn())},
            pool=PoolSettings(min_size=1),
            reap_interval=NEVER_TICKS,
            reconnect_delay=0.02,
            reconnect_delay_max=0.1,
        )
        async with manager:
            await knock(manager, "down")
            # Delays of at most 0.1 s: a dozen rounds in 1.2 s, none of them from a tick.
            await until(lambda: down.attempts >= 5, 1.2)
            pool = only_pool(manager)
            await until(lambda: not pool._tasks)  # between two attempts
            assert pool._refill_timer is not None
            # Empty and unused, but still trying to reach min_size: not to be forgotten.
            assert not pool.forgettable(time.monotonic() + 1000, 1)
        assert pool._refill_timer is None
        assert pool.forgettable(time.monotonic() + 1000, 1)
        attempts = down.attempts
        await anyio.sleep(0.3)
        assert down.attempts == attempts, "a closed pool kept reconnecting"


async def test_no_refill_timer_without_min_size() -> None:
    async with FakeServer() as down:
        async with TenantPoolManager(
            {"down": Target(down.dsn())},
            reap_interval=NEVER_TICKS,
            reconnect_delay=0.02,
            reconnect_delay_max=0.05,
        ) as manager:
            await knock(manager, "down")
            pool = only_pool(manager)
            assert pool._refill_timer is None
            await anyio.sleep(0.3)
            assert down.attempts == 1
            assert pool.forgettable(time.monotonic() + 1000, 1)


async def test_once_the_probe_is_through_the_rest_of_min_size_follows_at_once(
    restartable_pg: PostgresCluster, login_dsn: str
) -> None:
    pg = restartable_pg
    async with TenantPoolManager(
        {"acme": Target(login_dsn)},
        pool=PoolSettings(min_size=3, connect_timeout=2),
        reap_interval=NEVER_TICKS,
        reconnect_delay=0.05,
        reconnect_delay_max=0.2,
    ) as manager:
        async with manager.with_connection("acme"):
            pass
        assert manager.stats().total == 1  # below min_size, and no tick to refill it
        await anyio.to_thread.run_sync(pg.stop)
        await knock(manager, "acme")
        await anyio.to_thread.run_sync(pg.start_again)
        await until(lambda: manager.stats().idle == 3, 3)
        assert not manager.stats().backing_off


async def test_after_a_restart_min_size_is_refilled_at_each_pools_own_jittered_time(
    restartable_pg: PostgresCluster, login: tuple[str, str], login_dsn: str
) -> None:
    pg = restartable_pg
    n = 8
    settings = PoolSettings(min_size=1, connect_timeout=2)

    tenants = {prefix: [f"{prefix}{i}" for i in range(n)] for prefix in ("j", "s")}

    def manager(prefix: str, *, jitter: bool) -> TenantPoolManager:
        targets = {t: Target(tenant_dsn(login_dsn, t)) for t in tenants[prefix]}
        return TenantPoolManager(
            targets,
            pool=settings,
            reap_interval=NEVER_TICKS,
            reconnect_delay=0.1,
            reconnect_delay_max=0.8,
            reconnect_jitter=jitter,
        )

    async with manager("j", jitter=True) as jittered, manager("s", jitter=False) as steady:
        both = (jittered, steady)
        for m, prefix in zip(both, tenants, strict=True):
            for tenant in tenants[prefix]:
                async with m.with_connection(tenant):
                    pass
        assert [m.stats().idle for m in both] == [n, n]

        await anyio.to_thread.run_sync(pg.stop)
        # Each checkout finds its dead connection and starts its pool's backoff.
        for m, prefix in zip(both, tenants, strict=True):
            for tenant in tenants[prefix]:
                await knock(m, tenant)
        # Retries go on with the server down, though no tick runs.
        await until(lambda: all(m.stats().connect_errors > n for m in both), 30)

        await anyio.to_thread.run_sync(pg.start_again)

        def refilled() -> bool:
            return all(m.stats().idle == n and not m.stats().backing_off for m in both)

        # The largest delay is 0.8 s; the next tick would be 30 s away: well before it.
        await until(refilled, 20)
        for m in both:
            await drained(m)
        rows = await pg.fetch(
            "SELECT application_name, backend_start - pg_postmaster_start_time() AS after"
            " FROM pg_stat_activity WHERE usename = $1",
            login[0],
        )

    starts: dict[str, list[float]] = {"j": [], "s": []}
    for row in rows:
        after: timedelta = row["after"]
        starts[row["application_name"][0]].append(after.total_seconds())
    # One backend per pool: only the successful probe of each, nothing on top.
    assert [len(starts["j"]), len(starts["s"])] == [n, n]
    spread = {k: max(v) - min(v) for k, v in starts.items()}
    print(
        f"\nbackend starts after the server started (s): jittered"
        f" {sorted(round(s, 3) for s in starts['j'])}, steady"
        f" {sorted(round(s, 3) for s in starts['s'])}"
    )
    # Jittered pools each probe at their own time. (Two may still share a start time: the
    # server stamps the connections it accepts in one wake-up alike.) A loaded machine only
    # spreads them more. How much closer together the pools without jitter come back is a
    # timing, measured by the reconnect benchmark (peak attempts per 100 ms), not here.
    assert len(set(starts["j"])) >= n // 2
    assert spread["j"] >= 0.1


async def test_when_one_pool_finds_the_server_back_its_neighbours_stop_waiting(
    restartable_pg: PostgresCluster, login_dsn: str
) -> None:
    """Pools of one server deep in long waits come back about a second after the first one."""
    pg = restartable_pg
    tenants = [f"n{i}" for i in range(5)]
    async with TenantPoolManager(
        {t: Target(tenant_dsn(login_dsn, t)) for t in tenants},
        pool=PoolSettings(min_size=1, connect_timeout=2),
        reap_interval=NEVER_TICKS,
        reconnect_delay=6.0,
        reconnect_delay_max=6.0,
    ) as manager:
        for tenant in tenants:
            async with manager.with_connection(tenant):
                pass
        pools = list(manager._pools.values())
        # The first pool always draws the shortest wait, the others the longest: 6 s.
        pools[0]._backoff._rng = lambda: 0.0
        for pool in pools[1:]:
            pool._backoff._rng = lambda: 1.0
        await anyio.to_thread.run_sync(pg.stop)
        for tenant in tenants:
            await knock(manager, tenant)
        assert all(p.stats().retry_after > 5 for p in pools[1:])
        await anyio.to_thread.run_sync(pg.start_again)
        back = time.monotonic()
        # The first pool retries every 0.6 s (its floor), the rest a server-back window (1 s)
        # later: all back well before the 6 s the others had drawn (a ceiling, not a timing).
        await until(lambda: manager.stats().idle == len(tenants), 5)
        assert time.monotonic() - back < 5
        assert not manager.stats().backing_off


@pytest.mark.parametrize("jitter", [True, False])
async def test_refills_after_a_quick_restart_are_spread_over_the_tick(
    restartable_pg: PostgresCluster, login: tuple[str, str], login_dsn: str, jitter: bool
) -> None:
    """A restart shorter than the tick fails no connect, so no backoff spreads the pools'
    reconnects: the background task's refill spreads them over its interval instead."""
    pg = restartable_pg
    tenants = [f"q{i}" for i in range(10)]
    async with TenantPoolManager(
        {t: Target(tenant_dsn(login_dsn, t)) for t in tenants},
        pool=PoolSettings(min_size=1, connect_timeout=2),
        # The first tick comes after the restart is over (it takes well under a second), so
        # no connect ever meets a server that is down.
        reap_interval=1.5,
        reconnect_jitter=jitter,
    ) as manager:
        for tenant in tenants:
            async with manager.with_connection(tenant):
                pass
        await anyio.to_thread.run_sync(pg.restart)
        sql = (
            "SELECT extract(epoch FROM backend_start)::float8 AS t FROM pg_stat_activity"
            " WHERE usename = $1"
        )
        with anyio.fail_after(5):  # the dead connections look idle until a reap finds them
            while len(rows := await pg.fetch(sql, login[0])) < len(tenants):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert manager.stats().connect_errors == 0  # the server was back before any attempt
    starts = [row["t"] for row in rows]
    assert len(starts) == len(tenants)
    # With jitter, spread over the tick: a loaded machine only spreads them more, so only the
    # lower bound is a claim. Without, they come back together: how close together is a
    # timing, left to the reconnect benchmark.
    if jitter:
        assert max(starts) - min(starts) > 0.1
