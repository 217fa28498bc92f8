"""Scenario 1: checkout latency, one RLS tenant, sequential ``checkout + SELECT 1 + release``."""

from __future__ import annotations

import asyncio
from typing import Any

from tenantpool import PoolSettings, Target, TenantPoolManager

from . import _contenders as c
from ._harness import Context, Goal, Report, interleave, median, ratio, table, timed_loop

TITLE = "1. Checkout latency: one tenant, sequential checkout + SELECT 1 + release"
POOL_SIZE = 10
# min_size=0: issue 10's "sequential single task", which the pool serves with at most two
# connections, one reset while the other serves.
ONE = "tenantpool, a lone task (min_size=0)"


def run(ctx: Context) -> Report:
    iterations = ctx.pick(1000, 2000)
    results, held = asyncio.run(_measure(ctx.shared.dsn(), ctx.rounds, iterations))
    medians = {name: median(values) for name, values in results.items()}
    bare, pool, ours, one = (medians[n] for n in (c.BARE, c.POOL, c.TENANTPOOL, ONE))
    rows = [
        [name, f"{value:.0f}", f"{ratio(value, bare):.2f}x", f"{ratio(value, pool):.2f}x"]
        for name, value in medians.items()
    ]
    return Report(
        name="checkout",
        title=TITLE,
        table=table(["contender", "median µs per cycle", "vs bare", "vs asyncpg.Pool"], rows),
        notes=[
            f"{iterations} cycles per contender per round, {ctx.rounds} rounds interleaved;"
            f" pools of {POOL_SIZE} (opened beforehand, as the peers' pools do at creation),"
            f" but for {ONE!r}: max_size={POOL_SIZE}, min_size=0. tenantpool resets every"
            " connection after use (rollback, advisory locks, LISTEN, role, settings, temp"
            " tables, SQL prepared statements) and re-applies the tenant's setting in that same"
            " round trip, off the caller's path: with idle connections to spare, the next"
            f" checkout does not wait for it. {ONE!r} starts empty; the pool opens a second"
            " connection when the first is still being reset at the next checkout, and no"
            f" more (it ended with {held} connection(s))."
        ],
        goals=[
            Goal("tenantpool ≤ 0.75x asyncpg.Pool", ours <= 0.75 * pool, f"{ours / pool:.2f}x"),
            Goal("tenantpool ≤ 1.3x a bare connection", ours <= 1.3 * bare, f"{ours / bare:.2f}x"),
            Goal("a lone task: tenantpool ≤ 1.0x asyncpg.Pool", one <= pool, f"{one / pool:.2f}x"),
            Goal(
                "a lone task: tenantpool ≤ 1.3x a bare connection",
                one <= 1.3 * bare,
                f"{one / bare:.2f}x",
            ),
            Goal("a lone task holds ≤ 2 connections", held <= 2, str(held)),
        ],
        data={
            "iterations": iterations,
            "us_per_cycle": results,
            "median_us": medians,
            "lone_task_connections": held,
        },
        plot=lambda ax: _plot(ax, results),
    )


async def _measure(dsn: str, rounds: int, iterations: int) -> tuple[dict[str, list[float]], int]:
    target = Target(dsn, settings={"app.tenant_id": c.TENANT})
    settings = PoolSettings(max_size=POOL_SIZE)
    async with (
        c.contenders(dsn, POOL_SIZE) as steps,
        TenantPoolManager({c.TENANT: target}, pool=settings) as manager,
    ):

        async def one() -> None:
            async with manager.with_connection(c.TENANT) as conn:
                await conn.fetchval("SELECT 1")

        steps = {**steps, ONE: one}
        results = await interleave(
            rounds,
            {name: (lambda s=step: timed_loop(s, iterations)) for name, step in steps.items()},
        )
        return results, manager.stats().total


def _plot(ax: Any, results: dict[str, list[float]]) -> None:
    names = list(results)
    ax.boxplot([results[n] for n in names], vert=False)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_xlabel("µs per checkout + SELECT 1 + release (one value per round)")
    ax.set_xlim(left=0)
