"""Scenario 10: reuse before growth, and a burst on a warm pool (issue 10, items 1 and 2).

Sequential: one task, ``with_connection`` + ``SELECT 1`` 50 times at ``max_size=10``: how many
connections the pool ends with; then a cap of 4 with 4 tenants warm and 100 sequential checkouts
of one of them: how many steals. Spike: ``min_size=5, max_size=10``, connects slowed to 0.15 s
(an ``init`` that sleeps), 50 requests of 2 ms at once: the pool's size afterwards, the waits,
and how many requests were served before one that arrived earlier.
"""

from __future__ import annotations

import asyncio

import asyncpg

from tenantpool import PoolSettings, Target, TenantPoolManager

from ._harness import Context, Goal, Report, median, table, tenant_dsn, wait_until

TITLE = "11. Reuse before growth and a burst on a warm pool"
CONNECT = 0.15


def run(ctx: Context) -> Report:
    dsn = ctx.shared.dsn()
    held = asyncio.run(_sequential(dsn))
    steals, sizes = asyncio.run(_sequential_at_cap(dsn))
    spikes = [asyncio.run(_spike(dsn)) for _ in range(ctx.rounds)]
    size = max(s["size"] for s in spikes)
    inversions = sum(s["inversions"] for s in spikes)
    worst = max(s["max_wait"] for s in spikes)
    rows = [
        ["sequential, max_size=10: connections held", str(held)],
        ["sequential at a cap of 4, 4 tenants warm: steals", f"{steals} (sizes {sizes})"],
        [f"spike: pool size after (max of {ctx.rounds} rounds)", str(size)],
        ["spike: median wait", f"{median([s['median_wait'] for s in spikes]) * 1e3:.1f} ms"],
        ["spike: max wait", f"{worst * 1e3:.1f} ms"],
        ["spike: requests served before an earlier one", str(inversions)],
    ]
    return Report(
        name="bursts",
        title=TITLE,
        table=table(["measure", "value"], rows),
        goals=[
            Goal("sequential single task holds ≤ 2 connections", held <= 2, str(held)),
            Goal("no steals under the cap", steals == 0, str(steals)),
            Goal("spike: pool ends ≤ 7 connections", size <= 7, str(size)),
            Goal(
                "spike: served in arrival order (no request waits while a later one is served)",
                inversions == 0,
                str(inversions),
            ),
        ],
        data={"held": held, "steals": steals, "sizes": sizes, "spikes": spikes},
    )


async def _sequential(dsn: str) -> int:
    targets = {"a": Target(dsn, settings={"app.tenant_id": "a"})}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=10)) as manager:
        peak = 0
        for _ in range(50):
            async with manager.with_connection("a") as conn:
                await conn.execute("SELECT 1")
                peak = max(peak, manager.stats().total)
        return peak


async def _sequential_at_cap(dsn: str) -> tuple[int, list[int]]:
    targets = {t: Target(tenant_dsn(dsn, t)) for t in ("a", "b", "c", "d")}
    async with TenantPoolManager(targets, max_total_connections=4) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant) as conn:
                await conn.execute("SELECT 1")
        for _ in range(100):
            async with manager.with_connection("a") as conn:
                await conn.execute("SELECT 1")
        stats = manager.stats()
        return stats.steals, [p.size for p in stats.pools.values()]


async def _spike(dsn: str) -> dict[str, float]:
    slow = False

    async def init(conn: asyncpg.Connection) -> None:
        if slow:
            await asyncio.sleep(CONNECT)

    targets = {"a": Target(dsn)}
    settings = PoolSettings(min_size=5, max_size=10)
    async with TenantPoolManager(targets, pool=settings, init=init) as manager:
        async with manager.with_connection("a"):
            pass
        await wait_until(lambda: manager.stats().idle == 5, 10, "min_size refilled")
        slow = True
        loop = asyncio.get_running_loop()
        served: list[int] = []
        waits: dict[int, float] = {}

        async def request(i: int) -> None:
            began = loop.time()
            async with manager.with_connection("a") as conn:
                waits[i] = loop.time() - began
                served.append(i)
                await conn.execute("SELECT pg_sleep(0.002)")

        await asyncio.gather(*(request(i) for i in range(50)))
        await wait_until(
            lambda: all(not p.opening for p in manager.stats().pools.values()), 10, "opens done"
        )
        size = manager.stats().total
    inversions = sum(1 for k, i in enumerate(served) if any(j > i for j in served[:k]))
    return {
        "size": size,
        "inversions": inversions,
        "max_wait": max(waits.values()),
        "median_wait": median(list(waits.values())),
    }
