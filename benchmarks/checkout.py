"""Scenario 1: checkout latency, one RLS tenant, sequential ``checkout + SELECT 1 + release``."""

from __future__ import annotations

import asyncio
from typing import Any

from . import _contenders as c
from ._harness import Context, Goal, Report, interleave, median, ratio, table, timed_loop

TITLE = "1. Checkout latency: one tenant, sequential checkout + SELECT 1 + release"
POOL_SIZE = 10


def run(ctx: Context) -> Report:
    iterations = ctx.pick(1000, 2000)
    results = asyncio.run(_measure(ctx.shared.dsn(), ctx.rounds, iterations))
    medians = {name: median(values) for name, values in results.items()}
    bare, pool, ours = medians[c.BARE], medians[c.POOL], medians[c.TENANTPOOL]
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
            f" pools of {POOL_SIZE}. tenantpool resets every connection after use (rollback,"
            " advisory locks, LISTEN, role, settings, temp tables) and re-applies the tenant's"
            " setting in that same round trip, off the caller's path."
        ],
        goals=[
            Goal("tenantpool ≤ 0.75x asyncpg.Pool", ours <= 0.75 * pool, f"{ours / pool:.2f}x"),
            Goal("tenantpool ≤ 1.3x a bare connection", ours <= 1.3 * bare, f"{ours / bare:.2f}x"),
        ],
        data={"iterations": iterations, "us_per_cycle": results, "median_us": medians},
        plot=lambda ax: _plot(ax, results),
    )


async def _measure(dsn: str, rounds: int, iterations: int) -> dict[str, list[float]]:
    async with c.contenders(dsn, POOL_SIZE) as steps:
        return await interleave(
            rounds,
            {name: (lambda s=step: timed_loop(s, iterations)) for name, step in steps.items()},
        )


def _plot(ax: Any, results: dict[str, list[float]]) -> None:
    names = list(results)
    ax.boxplot([results[n] for n in names], vert=False)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_xlabel("µs per checkout + SELECT 1 + release (one value per round)")
    ax.set_xlim(left=0)
