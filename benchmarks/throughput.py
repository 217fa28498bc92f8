"""Scenario 2: throughput, 50 tasks sharing 20 connections, one RLS tenant."""

from __future__ import annotations

import asyncio
from typing import Any

from . import _contenders as c
from ._harness import Context, Goal, Report, for_duration, interleave, median, ratio, table

TITLE = "2. Throughput: 50 tasks over 20 connections, checkout + SELECT 1 + release"
TASKS = 50
POOL_SIZE = 20


def run(ctx: Context) -> Report:
    seconds = ctx.pick(1.5, 4.0)
    results = asyncio.run(_measure(ctx.shared.dsn(), ctx.rounds, seconds))
    medians = {name: median(values) for name, values in results.items()}
    pool, ours = medians[c.POOL], medians[c.TENANTPOOL]
    rows = [
        [name, f"{value:,.0f}", f"{ratio(value, pool):.2f}x"] for name, value in medians.items()
    ]
    return Report(
        name="throughput",
        title=TITLE,
        table=table(["contender", "median cycles/s", "vs asyncpg.Pool"], rows),
        notes=[
            f"{TASKS} tasks for {seconds:g} s per contender per round, {ctx.rounds} rounds"
            f" interleaved, {POOL_SIZE} connections each. The bare contender hands out"
            f" {POOL_SIZE} connections through a queue with no reset at all: the ceiling."
        ],
        goals=[Goal("tenantpool ≥ 1.0x asyncpg.Pool", ours >= pool, f"{ours / pool:.2f}x")],
        data={"seconds": seconds, "cycles_per_s": results, "median_cycles_per_s": medians},
        plot=lambda ax: _plot(ax, medians),
    )


async def _measure(dsn: str, rounds: int, seconds: float) -> dict[str, list[float]]:
    async def rate(step: c.Step) -> float:
        await for_duration(TASKS, 0.2, step)  # warm up: every connection used once
        return await for_duration(TASKS, seconds, step) / seconds

    async with c.contenders(dsn, POOL_SIZE) as steps:
        return await interleave(
            rounds, {name: (lambda s=step: rate(s)) for name, step in steps.items()}
        )


def _plot(ax: Any, medians: dict[str, float]) -> None:
    names = list(medians)
    ax.barh(names, [medians[n] for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel(f"checkouts per second, {TASKS} tasks over {POOL_SIZE} connections (median)")
