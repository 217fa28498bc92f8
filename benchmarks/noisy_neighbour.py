"""Scenario 9: noisy neighbour. A quiet tenant checks out in sequence while a noisy one floods.

Two settings: both tenants in one shared pool (``max_size=10``, RLS settings), and each tenant
a pool of its own under ``max_total_connections=10``. The noisy tenant runs N tasks of
``SELECT pg_sleep(0.01)``; the quiet one does ``SELECT 1`` checkouts one after another. Reported:
the quiet tenant's checkouts and its wait for a connection (p50 / p99), and the noisy tenant's
throughput (fairness must not cost the total much).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from tenantpool import PoolSettings, PoolTimeout, Target, TenantPoolManager

from ._harness import Context, Goal, PostgresCluster, Report, median, percentile, table, tenant_dsn

TITLE = "9. Noisy neighbour: a quiet tenant's waits while another floods its pool or the cap"
SIZE = 10
NOISY = (0, 50, 300)
SHARED, CAPPED = "shared pool (max_size=10)", "own pools, max_total_connections=10"


@dataclass
class Run:
    quiet_checkouts: int
    quiet_timeouts: int
    quiet_p50_ms: float | None
    quiet_p99_ms: float | None
    noisy_per_s: float


def run(ctx: Context) -> Report:
    seconds = ctx.pick(2.0, 5.0)
    rounds = min(ctx.rounds, 3)
    results: dict[tuple[str, int], list[Run]] = {}
    for _ in range(rounds):
        for setting in (SHARED, CAPPED):
            for noisy in NOISY:
                run_ = asyncio.run(_measure(ctx.shared, setting, noisy, seconds))
                results.setdefault((setting, noisy), []).append(run_)
    rows = []
    summary: dict[tuple[str, int], Run] = {}
    for (setting, noisy), runs in results.items():
        best = _median_run(runs)
        summary[(setting, noisy)] = best
        rows.append(
            [
                setting,
                str(noisy),
                f"{best.quiet_checkouts:,}",
                _ms(best.quiet_p50_ms) + " / " + _ms(best.quiet_p99_ms),
                str(best.quiet_timeouts),
                f"{best.noisy_per_s:,.0f}",
            ]
        )
    goals = []
    for setting in (SHARED, CAPPED):
        worst = summary[(setting, NOISY[-1])]
        p99 = worst.quiet_p99_ms
        goals.append(
            Goal(
                f"{setting}: quiet tenant's p99 wait ≤ 25 ms with {NOISY[-1]} noisy tasks",
                p99 is not None and p99 <= 25 and not worst.quiet_timeouts,
                f"p99 {_ms(p99)}, {worst.quiet_timeouts} timeouts",
            )
        )
    return Report(
        name="noisy_neighbour",
        title=TITLE,
        table=table(
            [
                "setting",
                "noisy tasks",
                f"quiet checkouts in {seconds:g} s",
                "quiet wait p50 / p99",
                "quiet timeouts",
                "noisy checkouts/s",
            ],
            rows,
        ),
        notes=[
            f"{seconds:g} s per cell, median of {rounds} rounds (by quiet checkouts);"
            " acquire_timeout=5 s. The wait is the time from entering with_connection to"
            " holding the connection."
        ],
        goals=goals,
        data={
            "seconds": seconds,
            "runs": {f"{s} | {n}": [asdict(r) for r in rs] for (s, n), rs in results.items()},
        },
    )


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.quiet_checkouts)[len(runs) // 2]


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


async def _measure(pg: PostgresCluster, setting: str, noisy: int, seconds: float) -> Run:
    dsn = pg.dsn()
    settings = PoolSettings(max_size=SIZE, acquire_timeout=5.0)
    if setting == SHARED:
        targets = {t: Target(dsn, settings={"app.tenant_id": t}) for t in ("noisy", "quiet")}
        manager = TenantPoolManager(targets, pool=settings)
    else:
        targets = {t: Target(tenant_dsn(dsn, t)) for t in ("noisy", "quiet")}
        manager = TenantPoolManager(targets, pool=settings, max_total_connections=SIZE)
    waits: list[float] = []
    timeouts = 0
    noisy_done = 0
    async with manager:
        for tenant in ("quiet", "noisy"):  # both pools exist and are warm
            async with manager.with_connection(tenant):
                pass
        stop = time.perf_counter() + seconds

        async def flood() -> None:
            nonlocal noisy_done
            while time.perf_counter() < stop:
                try:
                    async with manager.with_connection("noisy") as conn:
                        await conn.execute("SELECT pg_sleep(0.01)")
                    noisy_done += 1
                except PoolTimeout:
                    pass

        async def quiet() -> None:
            nonlocal timeouts
            if noisy:
                await asyncio.sleep(0.2)  # the flood is queued before the quiet tenant starts
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    async with manager.with_connection("quiet") as conn:
                        waits.append(time.perf_counter() - t0)
                        await conn.fetchval("SELECT 1")
                except PoolTimeout:
                    timeouts += 1

        await asyncio.gather(quiet(), *(flood() for _ in range(noisy)))
    return Run(
        quiet_checkouts=len(waits),
        quiet_timeouts=timeouts,
        quiet_p50_ms=median(waits) * 1e3 if waits else None,
        quiet_p99_ms=percentile(waits, 99) * 1e3 if waits else None,
        noisy_per_s=noisy_done / seconds,
    )
