"""Scenario 2: throughput, 50 tasks sharing 20 connections, one RLS tenant."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import _contenders as c
from ._harness import (
    Context,
    Goal,
    PostgresCluster,
    Report,
    for_duration,
    interleave,
    median,
    ratio,
    server_cpu,
    table,
)

TITLE = "2. Throughput: 50 tasks over 20 connections, checkout + SELECT 1 + release"
TASKS = 50
POOL_SIZE = 20


def run(ctx: Context) -> Report:
    seconds = ctx.pick(1.5, 3.0)
    results = asyncio.run(_measure(ctx.shared, ctx.rounds, seconds))
    medians = {name: median([r.rate for r in runs]) for name, runs in results.items()}
    pool, ours = medians[c.POOL], medians[c.TENANTPOOL]
    rows = [
        [
            name,
            f"{medians[name]:,.0f}",
            f"{ratio(medians[name], pool):.2f}x",
            f"{median([r.client_us for r in runs]):.0f}",
            _fmt(median([r.server_us for r in runs]) if runs[0].server_us is not None else None),
        ]
        for name, runs in results.items()
    ]
    return Report(
        name="throughput",
        title=TITLE,
        table=table(
            [
                "contender",
                "median cycles/s",
                "vs asyncpg.Pool",
                "client CPU µs/cycle",
                "server CPU µs/cycle",
            ],
            rows,
        ),
        notes=[
            f"{TASKS} tasks for {seconds:g} s per contender per round, {ctx.rounds} rounds"
            f" interleaved, {POOL_SIZE} connections each. The bare contender hands out"
            f" {POOL_SIZE} connections through a queue with no reset at all: the ceiling."
            " CPU per cycle: this process's, and the PostgreSQL server's processes' (from"
            " /proc), both on the machine's two cores; when both are busy, every µs the"
            " server spends on a reset is a µs the client cannot have."
        ],
        goals=[Goal("tenantpool ≥ 1.0x asyncpg.Pool", ours >= pool, f"{ours / pool:.2f}x")],
        data={
            "seconds": seconds,
            "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
            "median_cycles_per_s": medians,
        },
        plot=lambda ax: _plot(ax, medians),
    )


@dataclass
class Run:
    rate: float  # cycles per second
    client_us: float  # this process's CPU per cycle
    server_us: float | None  # the server processes' CPU per cycle (None: not ours to read)


async def _measure(pg: PostgresCluster, rounds: int, seconds: float) -> dict[str, list[Run]]:
    async def rate(step: c.Step) -> Run:
        await for_duration(TASKS, 0.2, step)  # warm up: every connection used once
        server, client = server_cpu(pg), time.process_time()
        done = await for_duration(TASKS, seconds, step)
        server_after = server_cpu(pg)
        return Run(
            rate=done / seconds,
            client_us=(time.process_time() - client) / done * 1e6,
            server_us=None
            if server is None or server_after is None
            else (server_after - server) / done * 1e6,
        )

    async with c.contenders(pg.dsn(), POOL_SIZE) as steps:
        return await interleave(
            rounds, {name: (lambda s=step: rate(s)) for name, step in steps.items()}
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _plot(ax: Any, medians: dict[str, float]) -> None:
    names = list(medians)
    ax.barh(names, [medians[n] for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel(f"checkouts per second, {TASKS} tasks over {POOL_SIZE} connections (median)")
