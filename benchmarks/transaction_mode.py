"""Scenario 8: tenant state per transaction, direct and through PgBouncer in transaction pooling.

Each cycle is one request's worth: check out, run ``SELECT current_setting('app.tenant_id')`` in a
transaction that carries the tenant's setting, commit, release. The hand-written equivalent is
what teams write behind a transaction pooler today: asyncpg.Pool, ``conn.transaction()``, and
``set_config(..., true)`` as the transaction's first statement.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg

from tenantpool import PoolSettings, Target, TenantPoolManager

from ._harness import (
    Context,
    Goal,
    PostgresCluster,
    Report,
    for_duration,
    interleave,
    median,
    ratio,
    table,
    timed_loop,
)

TITLE = "8. Tenant state per transaction: direct and through PgBouncer (transaction pooling)"
TENANT = "acme"
QUERY = "SELECT current_setting('app.tenant_id')"
TASKS = 50
POOL_SIZE = 20

HAND = "asyncpg.Pool + transaction + set_config(true)"
HAND_NO_RESET = "asyncpg.Pool (reset=None) + transaction + set_config(true)"
OURS = "tenantpool state_scope='transaction'"
OURS_SESSION = "tenantpool state_scope='session'"
DIRECT, BOUNCER = "direct", "PgBouncer"

Step = Callable[[], Awaitable[object]]


def run(ctx: Context) -> Report:
    iterations = ctx.pick(500, 1500)
    seconds = ctx.pick(1.0, 2.0)
    latency, rate = asyncio.run(_measure(ctx.shared, ctx.rounds, iterations, seconds))
    lat = {key: median(values) for key, values in latency.items()}
    thr = {key: median(values) for key, values in rate.items()}
    rows = []
    for key in latency:
        route, name = key
        hand = (route, HAND)
        rows.append(
            [
                route,
                name,
                f"{lat[key]:.0f}",
                f"{ratio(lat[key], lat[hand]):.2f}x",
                f"{thr[key]:,.0f}",
                f"{ratio(thr[key], thr[hand]):.2f}x",
            ]
        )
    goals = []
    for route in (DIRECT, BOUNCER):
        ours, hand = (route, OURS), (route, HAND)
        goals += [
            Goal(
                f"{route}: tenantpool's transaction mode ≥ 1.0x the hand-written throughput",
                thr[ours] >= thr[hand],
                f"{thr[ours] / thr[hand]:.2f}x",
            ),
            Goal(
                f"{route}: tenantpool's transaction mode ≤ 1.0x the hand-written latency",
                lat[ours] <= lat[hand],
                f"{lat[ours] / lat[hand]:.2f}x",
            ),
        ]
    session, ours = (DIRECT, OURS_SESSION), (DIRECT, OURS)
    return Report(
        name="transaction_mode",
        title=TITLE,
        table=table(
            [
                "route",
                "contender",
                "median µs per cycle (1 task)",
                "vs hand-written",
                f"median cycles/s ({TASKS} tasks)",
                "vs hand-written",
            ],
            rows,
        ),
        notes=[
            f"Latency: {iterations} sequential cycles per round; throughput: {TASKS} tasks for"
            f" {seconds:g} s over {POOL_SIZE} connections (PgBouncer: {POOL_SIZE} client"
            f" connections onto a pool of {POOL_SIZE} server connections); {ctx.rounds} rounds"
            " interleaved. Behind PgBouncer the hand-written pools run with"
            " statement_cache_size=0, as they must on PgBouncer 1.18; tenantpool sets it itself"
            " in transaction mode.",
            f"What the stricter mode costs on a direct server: tenantpool's transaction mode"
            f" takes {ratio(lat[ours], lat[session]):.2f}x the latency of its session mode"
            f" ({lat[ours]:.0f} vs {lat[session]:.0f} µs) and gives"
            f" {ratio(thr[ours], thr[session]):.2f}x its throughput: two more round trips per"
            " scope (BEGIN with the state, COMMIT) and no statement cache.",
        ],
        goals=goals,
        data={
            "iterations": iterations,
            "seconds": seconds,
            "latency_us": {" | ".join(k): v for k, v in latency.items()},
            "cycles_per_s": {" | ".join(k): v for k, v in rate.items()},
        },
    )


async def _contenders(
    dsn: str, route: str, stack: contextlib.AsyncExitStack
) -> dict[tuple[str, str], Step]:
    """The contenders reaching the server by ``dsn``, closed by ``stack``."""
    via_bouncer = route == BOUNCER
    cache: dict[str, Any] = {"statement_cache_size": 0} if via_bouncer else {}
    steps: dict[tuple[str, str], Step] = {}
    for name, reset in ((HAND, True), (HAND_NO_RESET, False)):
        pool = await asyncpg.create_pool(
            dsn,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            **cache,
            **({} if reset else {"reset": _no_reset}),
        )
        stack.push_async_callback(pool.close)

        async def hand_written(pool: asyncpg.Pool = pool) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", TENANT)
                await conn.fetchval(QUERY)

        steps[(route, name)] = hand_written
    scopes: list[tuple[str, Literal["session", "transaction"]]] = [(OURS, "transaction")]
    if not via_bouncer:
        scopes.append((OURS_SESSION, "session"))
    for name, scope in scopes:
        manager = TenantPoolManager(
            {TENANT: Target(dsn, settings={"app.tenant_id": TENANT})},
            pool=PoolSettings(min_size=POOL_SIZE, max_size=POOL_SIZE, state_scope=scope),
        )
        await stack.enter_async_context(manager)

        async def ours(manager: TenantPoolManager = manager) -> None:
            async with manager.with_connection(TENANT) as conn:
                await conn.fetchval(QUERY)

        steps[(route, name)] = ours
    return steps


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def _measure(
    pg: PostgresCluster, rounds: int, iterations: int, seconds: float
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]]]:
    from _pgbouncer import PgBouncer  # the tests' harness, on the path _harness set up

    settings = {"default_pool_size": str(POOL_SIZE), "max_client_conn": "1000"}
    with PgBouncer(pg, {pg.superuser: pg.superuser_password}, settings=settings) as bouncer:
        async with contextlib.AsyncExitStack() as stack:
            steps: dict[tuple[str, str], Step] = {}
            for route, dsn in (
                (DIRECT, pg.dsn()),
                (BOUNCER, bouncer.dsn(pg.superuser, pg.superuser_password)),
            ):
                steps.update(await _contenders(dsn, route, stack))

            async def rate(step: Step) -> float:
                await for_duration(TASKS, 0.2, step)  # every connection used once
                return await for_duration(TASKS, seconds, step) / seconds

            latency = await interleave(
                rounds, {k: (lambda s=s: timed_loop(s, iterations)) for k, s in steps.items()}
            )
            throughput = await interleave(
                rounds, {k: (lambda s=s: rate(s)) for k, s in steps.items()}
            )
    return latency, throughput
