"""Scenario 11: overload and observability at scale (issue 10, items 3 and 7).

Overload: every slot under a cap of 4 is held by checkouts that outlast ``acquire_timeout``
(1 s), and 10,000 more checkouts over 10 other tenants, arriving over about half a second (100
every 5 ms), queue behind them and time out. How
long each took to get its ``PoolTimeout`` (the goal: within 10% of the timeout), and how late
the event loop ran a 5 ms sleep meanwhile (its lag; the goal: never over 50 ms).

Observability: ``stats()`` and ``health()`` with 10,000 pools known to the manager (created
through the manager's private ``_pool_for``, without connecting: only their count matters).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from tenantpool import PoolSettings, PoolTimeout, Target, TenantPoolManager

from ._harness import Context, Goal, Report, median, percentile, table, tenant_dsn

TITLE = "12. Overload at the cap (10,000 waiters timing out) and stats/health with 10,000 pools"
WAITERS = 10_000
TIMEOUT = 1.0
POOLS = 10_000


def run(ctx: Context) -> Report:
    dsn = ctx.shared.dsn()
    elapsed, lags, own_lags, gc_max = asyncio.run(_overload(dsn))
    stats_ms, detail_ms, health_ms = asyncio.run(_observability(dsn, ctx.pick(5, 20)))
    worst = max(elapsed) if elapsed else float("nan")
    rows = [
        ["PoolTimeouts raised", f"{len(elapsed):,} of {WAITERS:,}"],
        ["time to PoolTimeout, median", f"{median(elapsed):.3f} s"],
        ["time to PoolTimeout, p99", f"{percentile(elapsed, 99):.3f} s"],
        ["time to PoolTimeout, max", f"{worst:.3f} s"],
        ["event loop lag, max", f"{max(lags) * 1000:.1f} ms"],
        ["event loop lag, p99", f"{percentile(lags, 99) * 1000:.1f} ms"],
        ["longest garbage collection meanwhile", f"{gc_max * 1000:.1f} ms"],
        ["event loop lag outside garbage collection, max", f"{max(own_lags) * 1000:.1f} ms"],
        [f"stats() with {POOLS:,} pools, median", f"{stats_ms:.3f} ms"],
        [f"stats().pools first read, {POOLS:,} pools, median", f"{detail_ms:.1f} ms"],
        [f"health() with {POOLS:,} pools, median", f"{health_ms:.3f} ms"],
    ]
    return Report(
        name="overload",
        title=TITLE,
        table=table(["measure", "value"], rows),
        notes=[
            f"Cap 4 held by 4 tenants; {WAITERS:,} checkouts over 10 other tenants,"
            f" acquire_timeout {TIMEOUT} s, 100 started every 5 ms. Lag: how late a"
            " 5 ms sleep wakes, sampled throughout. Python's cyclic garbage collector runs"
            " full collections over the 10,000 tasks and their exceptions (tracebacks hold"
            " frames), which any asyncio program with that many tasks pays; the lag outside"
            " them (each sample minus the collections that ran during it) is tenantpool's."
        ],
        goals=[
            Goal(
                "each PoolTimeout within 10% of acquire_timeout",
                len(elapsed) == WAITERS and worst <= 1.1 * TIMEOUT,
                f"max {worst:.3f} s",
            ),
            Goal(
                "event loop never blocked > 50 ms (outside garbage collection)",
                max(own_lags) <= 0.05,
                f"{max(own_lags) * 1e3:.0f} ms; with collections {max(lags) * 1e3:.0f} ms",
            ),
            Goal(f"health() with {POOLS:,} pools < 1 ms", health_ms < 1, f"{health_ms:.3f} ms"),
            Goal(
                f"stats() totals with {POOLS:,} pools < 1 ms",
                stats_ms < 1,
                f"{stats_ms:.3f} ms; its pools mapping is filled when first read",
            ),
        ],
        data={
            "seconds_to_timeout": {
                "median": median(elapsed),
                "p99": percentile(elapsed, 99),
                "max": worst,
                "count": len(elapsed),
            },
            "loop_lag_ms": {
                "max": max(lags) * 1e3,
                "p99": percentile(lags, 99) * 1e3,
                "max_outside_gc": max(own_lags) * 1e3,
                "longest_gc": gc_max * 1e3,
            },
            "stats_ms": stats_ms,
            "stats_pools_read_ms": detail_ms,
            "health_ms": health_ms,
        },
    )


class _Collections:
    """Time spent in the cyclic garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            pause = time.perf_counter() - self._began
            self.total += pause
            self.longest = max(self.longest, pause)


async def _overload(dsn: str) -> tuple[list[float], list[float], list[float], float]:
    holders = [f"h{i}" for i in range(4)]
    waiting = [f"w{i}" for i in range(10)]
    targets = {t: Target(tenant_dsn(dsn, t)) for t in holders + waiting}
    manager = TenantPoolManager(
        targets, max_total_connections=4, pool=PoolSettings(acquire_timeout=TIMEOUT)
    )
    loop = asyncio.get_running_loop()
    elapsed: list[float] = []
    lags: list[float] = []
    own_lags: list[float] = []
    collections = _Collections()
    release = asyncio.Event()
    running = True

    async def hold(tenant: str, ready: asyncio.Event) -> None:
        async with manager.with_connection(tenant):
            ready.set()
            await release.wait()

    async def checkout(tenant: str) -> None:
        began = loop.time()
        try:
            async with manager.with_connection(tenant):
                pass
        except PoolTimeout:
            elapsed.append(loop.time() - began)

    async def watch() -> None:
        while running:
            began, collected = loop.time(), collections.total
            await asyncio.sleep(0.005)
            lag = max(0.0, loop.time() - began - 0.005)
            lags.append(lag)
            own_lags.append(max(0.0, lag - (collections.total - collected)))

    gc.callbacks.append(collections)
    async with manager:
        readies = [asyncio.Event() for _ in holders]
        held = [asyncio.create_task(hold(t, r)) for t, r in zip(holders, readies, strict=True)]
        for ready in readies:
            await ready.wait()
        watcher = asyncio.create_task(watch())
        crowd = []
        for i in range(WAITERS):
            crowd.append(asyncio.create_task(checkout(waiting[i % len(waiting)])))
            if i % 100 == 99:  # 10,000 arriving over about half a second
                await asyncio.sleep(0.005)
        await asyncio.gather(*crowd)
        running = False
        release.set()
        await asyncio.gather(*held, watcher)
    gc.callbacks.remove(collections)
    return elapsed, lags, own_lags, collections.longest


async def _observability(dsn: str, calls: int) -> tuple[float, float, float]:
    targets = {f"p{i}": Target(tenant_dsn(dsn, f"p{i}")) for i in range(POOLS)}
    async with TenantPoolManager(targets) as manager:
        for target in targets.values():
            manager._pool_for(target)
        stats_times: list[float] = []
        detail_times: list[float] = []
        health_times: list[float] = []
        for _ in range(calls):
            began = time.perf_counter()
            stats = manager.stats()
            stats_times.append((time.perf_counter() - began) * 1e3)
            began = time.perf_counter()
            len(stats.pools)  # the per-pool figures, taken when first read
            detail_times.append((time.perf_counter() - began) * 1e3)
            del stats  # freeing 10,000 snapshots is no part of the next call
            began = time.perf_counter()
            await manager.health()
            health_times.append((time.perf_counter() - began) * 1e3)
    return median(stats_times), median(detail_times), median(health_times)
