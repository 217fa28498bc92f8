"""stats() totals and health() from running figures, not a pass over the pools (issue 10, 7)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from _postgres import PostgresCluster
from _support import FakeServer, drained, tenant_dsn, until

from tenantpool import PoolSettings, Target, TenantPoolManager, TenantUnavailable
from tenantpool._pool import Pool
from tenantpool._stats import PoolStats

pytestmark = pytest.mark.anyio


def check(manager: TenantPoolManager) -> None:
    """The running totals agree with the pools' own figures."""
    stats = manager.stats()
    pools = stats.pools.values()
    assert stats.total == sum(p.size for p in pools)
    assert stats.in_use == sum(p.in_use for p in pools)
    assert stats.idle == sum(p.idle for p in pools)
    assert stats.waiting == sum(p.waiting for p in pools)
    assert stats.backing_off == sum(p.backing_off for p in pools)


async def test_running_totals_agree_with_the_pools_throughout_a_burst(
    pg: PostgresCluster,
) -> None:
    dsn = pg.dsn()
    targets = {f"t{i}": Target(tenant_dsn(dsn, f"t{i}")) for i in range(12)}
    settings = PoolSettings(max_size=3, acquire_timeout=0.3)
    async with TenantPoolManager(targets, max_total_connections=8, pool=settings) as manager:
        rng = random.Random(5)

        async def checkout(tenant: str) -> None:
            try:
                async with manager.with_connection(tenant) as conn:
                    check(manager)
                    await conn.execute("SELECT pg_sleep(0.01)")
            except Exception as exc:  # timeouts are part of the mix
                assert type(exc).__name__ == "PoolTimeout"

        async def watch() -> None:
            while True:
                check(manager)
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                async with anyio.create_task_group() as burst:
                    for _ in range(300):
                        burst.start_soon(checkout, f"t{rng.randrange(12)}")
                tg.cancel_scope.cancel()
        await drained(manager)
        check(manager)
        stats = manager.stats()
        assert stats.in_use == 0 and stats.waiting == 0 and stats.idle == stats.total > 0


@asynccontextmanager
async def three_warm_pools(pg: PostgresCluster) -> AsyncIterator[TenantPoolManager]:
    dsn = pg.dsn()
    targets = {f"t{i}": Target(tenant_dsn(dsn, f"t{i}")) for i in range(3)}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=1)) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant):
                pass
        await drained(manager)
        yield manager


async def test_health_and_repr_never_ask_each_pool(
    pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with three_warm_pools(pg) as manager:

        def per_pool(self: Pool) -> None:
            raise AssertionError("a pass over the pools")

        monkeypatch.setattr(Pool, "stats", per_pool)
        report = await manager.health()
        assert report.status == "ok" and report.targets == 3 and report.idle == 3
        assert "in 3 pools" in repr(manager)


async def test_stats_asks_each_pool_only_when_its_figures_are_read(
    pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with three_warm_pools(pg) as manager:
        asked: list[str] = []
        snapshot = Pool.stats

        def counted(self: Pool) -> PoolStats:
            asked.append(self.name)
            return snapshot(self)

        monkeypatch.setattr(Pool, "stats", counted)
        stats = manager.stats()
        assert asked == [] and stats.total == stats.idle == 3
        # Read once, all at once: a snapshot, not live figures.
        async with manager.with_connection("t0"):
            assert len(stats.pools) == 3 and len(asked) == 3
            assert sum(p.in_use for p in stats.pools.values()) == 1
            assert sum(p.in_use for p in manager.stats().pools.values()) == 1
        assert sum(p.in_use for p in stats.pools.values()) == 1  # unchanged
        assert len(asked) == 6
        assert dict(stats.pools) == {name: stats.pools[name] for name in stats.pools}


async def test_longest_wait_and_the_targets_backing_off(pg: PostgresCluster) -> None:
    async with FakeServer() as down:
        targets = {"a": Target(pg.dsn()), "down": Target(down.dsn())}
        async with TenantPoolManager(targets, pool=PoolSettings(max_size=1)) as manager:
            gate = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def hold() -> None:
                    async with manager.with_connection("a"):
                        await gate.wait()

                async def wait() -> None:
                    async with manager.with_connection("a"):
                        pass

                tg.start_soon(hold)
                await until(lambda: manager.stats().in_use == 1)
                tg.start_soon(wait)
                await until(lambda: manager.stats().waiting == 1)
                await anyio.sleep(0.05)  # let the wait grow measurably, whatever its length
                report = await manager.health()
                assert report.waiting == 1 and report.longest_wait >= 0.05
                gate.set()
            report = await manager.health()
            assert report.waiting == 0 and report.longest_wait == 0.0

            with pytest.raises(TenantUnavailable):
                async with manager.with_connection("down"):
                    pass
            report = await manager.health()
            (name,) = report.backing_off
            assert manager.stats().pools[name].backing_off
            assert report.status == "degraded"
            check(manager)
            await drained(manager)
