"""Scenario 3: 1,000 credentials-per-tenant roles, Zipf traffic, a server with 100 connections.

The hand-rolled way is a dict of ``asyncpg.Pool``, one per tenant, created on first use: each is
sized on its own, so the total grows with the tenants seen until the server refuses. tenantpool
gets the same per-pool size and a cap of 50 over all pools. The server's own count of client
connections is sampled from ``pg_stat_activity`` every few ms by a thread of its own.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from tenantpool import PoolSettings, Target, TenantPoolManager

from ._harness import (
    Context,
    Goal,
    PostgresCluster,
    Report,
    cluster,
    interleave,
    median,
    percentile,
    table,
)

TITLE = "3. Many tenants: credentials per tenant, Zipf traffic, server max_connections=100"
SERVER_MAX = 100
CAP = 50
PER_POOL = 5
TASKS = 200
ZIPF_S = 1.1
PASSWORD = "bench-tenant-pw"
HAND_ROLLED = "dict of asyncpg.Pool"
TENANTPOOL = f"tenantpool, cap {CAP}"

Checkout = Callable[[str], Awaitable[None]]


@dataclass
class Run:
    checkouts_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_kinds: dict[str, int]
    server_peak: int
    tenants_seen: int
    steals: int | None  # connections closed for another tenant's checkout (tenantpool only)


def run(ctx: Context) -> Report:
    tenants = ctx.pick(1000, 1000)
    seconds = ctx.pick(4.0, 10.0)
    rounds = ctx.pick(2, min(ctx.rounds, 5))
    with cluster(max_connections=str(SERVER_MAX)) as pg:
        roles = _create_roles(pg, tenants)
        try:
            results = asyncio.run(_measure(pg, roles, rounds, seconds))
        finally:
            pg.execute_sync(f"DROP ROLE IF EXISTS {', '.join(roles)}")
    rows, summary = [], {}
    for name, runs in results.items():
        summary[name] = {
            "checkouts_per_s": median([r.checkouts_per_s for r in runs]),
            "p50_ms": median([r.p50_ms for r in runs]),
            "p99_ms": median([r.p99_ms for r in runs]),
            "errors": sum(r.errors for r in runs),
            "server_peak": max(r.server_peak for r in runs),
            "tenants_seen": median([r.tenants_seen for r in runs]),
            "steals_per_s": None
            if runs[0].steals is None
            else median([(r.steals or 0) / seconds for r in runs]),
        }
        s = summary[name]
        kinds = sorted({k for r in runs for k in r.error_kinds})
        rows.append(
            [
                name,
                f"{s['checkouts_per_s']:,.0f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['errors']:,}" + (f" ({', '.join(kinds)})" if kinds else ""),
                s["server_peak"],
                f"{s['tenants_seen']:,.0f}",
                "n/a" if s["steals_per_s"] is None else f"{s['steals_per_s']:,.0f}",
            ]
        )
    ours, theirs = summary[TENANTPOOL], summary[HAND_ROLLED]
    return Report(
        name="many_tenants",
        title=TITLE,
        table=table(
            [
                "contender",
                "checkouts/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "server peak",
                "tenants seen",
                "steals/s",
            ],
            rows,
        ),
        notes=[
            f"{tenants} login roles, one per tenant; {TASKS} tasks pick a tenant from a Zipf law"
            f" (s = {ZIPF_S}) and run checkout + SELECT 1 + release for {seconds:g} s, {rounds}"
            f" rounds interleaved, fresh pools each round. Every pool may hold {PER_POOL}"
            f" connections; the server takes {SERVER_MAX} (3 kept for superusers). Errors and"
            " the server peak are over all rounds; rates and latencies are medians of rounds."
            " Latency is per checkout, waiting for a connection included. A steal closes"
            " another tenant's idle connection to open one: with credentials per tenant, every"
            " tenant beyond what 50 connections hold warm pays a connect (SCRAM included)."
        ],
        goals=[
            Goal(
                "tenantpool: zero errors with the server peak ≤ the cap",
                ours["errors"] == 0 and ours["server_peak"] <= CAP,
                f"{ours['errors']} errors, peak {ours['server_peak']}",
            ),
            Goal(
                "the hand-rolled pools hit 'too many connections'",
                theirs["errors"] > 0,
                f"{theirs['errors']:,} errors, peak {theirs['server_peak']}",
            ),
        ],
        data={
            "tenants": tenants,
            "seconds": seconds,
            "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
            "summary": summary,
        },
        plot=lambda ax: _plot(ax, results),
    )


def _create_roles(pg: PostgresCluster, count: int) -> list[str]:
    prefix = pg.unique_name("bench_tenant")
    roles = [f"{prefix}_{i}" for i in range(count)]
    # One SCRAM verifier for all: the server would otherwise hash the password 1,000 times.
    pg.execute_sync(f"CREATE ROLE {roles[0]} LOGIN PASSWORD '{PASSWORD}'")
    verifier = pg.fetchval_sync("SELECT rolpassword FROM pg_authid WHERE rolname = $1", roles[0])
    pg.execute_sync(
        ";".join(f"CREATE ROLE {role} LOGIN PASSWORD '{verifier}'" for role in roles[1:])
    )
    return roles


def _zipf_picker(roles: list[str], seed: int) -> Callable[[], str]:
    weights = [1 / (rank**ZIPF_S) for rank in range(1, len(roles) + 1)]
    rng = random.Random(seed)
    batch: list[str] = []

    def pick() -> str:
        if not batch:
            batch.extend(rng.choices(roles, weights=weights, k=4096))
        return batch.pop()

    return pick


@contextmanager
def _server_peak(dsn: str, prefix: str) -> Iterator[Callable[[], int]]:
    """Sample the server's count of tenants' connections every 2 ms, from a thread."""
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        import psycopg  # the bench extra's, not the test suite's (see the runner's NEEDS)

        nonlocal peak
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn), autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE %s",
                    (prefix + "%",),
                ).fetchone()
                peak = max(peak, row[0] if row else 0)
                time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()


async def _load(
    checkout: Checkout, pick: Callable[[], str], seconds: float
) -> tuple[list[float], dict[str, int], set[str]]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    seen: set[str] = set()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (started := time.perf_counter()) < deadline:
            role = pick()
            seen.add(role)
            try:
                await checkout(role)
            except Exception as exc:
                kind = type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                await asyncio.sleep(0.001)  # as a client backing off would; no hot error loop
            else:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return latencies, errors, seen


async def _measure(
    pg: PostgresCluster, roles: list[str], rounds: int, seconds: float
) -> dict[str, list[Run]]:
    prefix = roles[0].rsplit("_", 1)[0]
    dsns = {role: pg.dsn(role, PASSWORD) for role in roles}
    rounds_done = 0

    async def one(name: str) -> Run:
        pick = _zipf_picker(roles, seed=rounds_done)
        with _server_peak(pg.superuser_dsn, prefix) as peak:
            steals: int | None = None
            if name == HAND_ROLLED:
                latencies, errors, seen = await _hand_rolled(dsns, pick, seconds)
            else:
                latencies, errors, seen, steals = await _tenantpool(dsns, pick, seconds)
            await asyncio.sleep(0.05)
            server_peak = peak()
        return Run(
            checkouts_per_s=len(latencies) / seconds,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            errors=sum(errors.values()),
            error_kinds=errors,
            server_peak=server_peak,
            tenants_seen=len(seen),
            steals=steals,
        )

    async def hand_rolled() -> Run:
        return await one(HAND_ROLLED)

    async def tenantpool() -> Run:
        nonlocal rounds_done
        rounds_done += 1
        return await one(TENANTPOOL)

    return await interleave(rounds, {HAND_ROLLED: hand_rolled, TENANTPOOL: tenantpool})


async def _hand_rolled(
    dsns: dict[str, str], pick: Callable[[], str], seconds: float
) -> tuple[list[float], dict[str, int], set[str]]:
    pools: dict[str, asyncio.Task[asyncpg.Pool]] = {}

    async def checkout(role: str) -> None:
        # One creation per tenant however many requests race for it, as a careful hand would.
        task = pools.get(role)
        if task is None or (task.done() and task.exception() is not None):
            task = pools[role] = asyncio.ensure_future(
                asyncpg.create_pool(dsns[role], min_size=0, max_size=PER_POOL)
            )
        pool = await asyncio.shield(task)
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")

    try:
        return await _load(checkout, pick, seconds)
    finally:
        created = [t.result() for t in pools.values() if t.done() and t.exception() is None]
        await asyncio.gather(*(p.close() for p in created))


async def _tenantpool(
    dsns: dict[str, str], pick: Callable[[], str], seconds: float
) -> tuple[list[float], dict[str, int], set[str], int]:
    targets = {role: Target(dsn) for role, dsn in dsns.items()}
    manager = TenantPoolManager(
        targets, max_total_connections=CAP, pool=PoolSettings(max_size=PER_POOL)
    )

    async def checkout(role: str) -> None:
        async with manager.with_connection(role) as conn:
            await conn.execute("SELECT 1")

    async with manager:
        latencies, errors, seen = await _load(checkout, pick, seconds)
        return latencies, errors, seen, manager.stats().steals


def _plot(ax: Any, results: dict[str, list[Run]]) -> None:
    names = list(results)
    rates = [median([r.checkouts_per_s for r in results[n]]) for n in names]
    errors = [median([r.errors for r in results[n]]) for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], rates, width=0.4, label="checkouts/s", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], errors, width=0.4, label="errors per round", color="#c44e52")
    ax.set_xticks(list(x), names)
    ax.legend()
