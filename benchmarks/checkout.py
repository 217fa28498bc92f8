"""Checkout latency: sequential ``checkout + SELECT 1 + release`` for one RLS tenant.

Contenders run round by round, interleaved, against one throwaway cluster, so machine drift
hits all of them alike; the report gives medians over rounds and ratios within this run.

    python -m benchmarks.checkout [--rounds 7] [--iterations 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _postgres import PostgresCluster

from tenantpool import PoolSettings, Target, TenantPoolManager

Step = Callable[[], Awaitable[None]]
POOL_SIZE = 10


async def measure(step: Step, iterations: int) -> float:
    for _ in range(iterations // 10):
        await step()
    started = time.perf_counter()
    for _ in range(iterations):
        await step()
    return (time.perf_counter() - started) / iterations * 1e6


async def run(dsn: str, rounds: int, iterations: int) -> dict[str, list[float]]:
    bare = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    manager = TenantPoolManager(
        {"acme": Target(dsn, settings={"app.tenant_id": "acme"})},
        pool=PoolSettings(max_size=POOL_SIZE),
    )
    await manager.start()

    async def bare_step() -> None:
        await bare.fetchval("SELECT 1")

    async def pool_step() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def pool_set_config_step() -> None:
        async with pool.acquire() as conn:
            await conn.execute("SELECT set_config('app.tenant_id', $1, false)", "acme")
            await conn.fetchval("SELECT 1")

    async def tenantpool_step() -> None:
        async with manager.with_connection("acme") as conn:
            await conn.fetchval("SELECT 1")

    contenders: dict[str, Step] = {
        "bare asyncpg connection": bare_step,
        "asyncpg.Pool (default reset)": pool_step,
        "asyncpg.Pool + set_config": pool_set_config_step,
        "tenantpool (RLS setting)": tenantpool_step,
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for _ in range(rounds):
            for name, step in contenders.items():
                results[name].append(await measure(step, iterations))
    finally:
        await manager.close()
        await pool.close()
        await bare.close()
    return results


def report(results: dict[str, list[float]]) -> str:
    medians = {name: statistics.median(values) for name, values in results.items()}
    bare = medians["bare asyncpg connection"]
    pool = medians["asyncpg.Pool (default reset)"]
    lines = [
        "| contender | median µs | vs bare | vs asyncpg.Pool |",
        "|---|---:|---:|---:|",
    ]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.0f} | {value / bare:.2f}x | {value / pool:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    with PostgresCluster() as cluster:
        results = asyncio.run(run(cluster.dsn(), args.rounds, args.iterations))
    print(report(results))


if __name__ == "__main__":
    main()
