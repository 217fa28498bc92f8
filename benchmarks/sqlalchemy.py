"""SQLAlchemy: a FastAPI endpoint doing an ORM ``select`` of a tenant's rows, three ways.

The apps (``benchmarks/_sqlalchemy_apps.py``): plain SQLAlchemy (``create_async_engine``'s pool,
``set_config(..., true)`` at the start of each request's transaction), tenantpool's
``TenantSession``, and fastapi-tenancy 0.5's RLS provider when it is installed. Each serves
``GET /notes`` from a shared table under row-level security, runs under uvicorn in a process
of its own and logs in as a role of its own, so that the server's backends can be counted per
contender while wrk (else the httpx client of ``benchmarks/http.py``) rotates the tenant per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from ._harness import (
    Context,
    Goal,
    PostgresCluster,
    Report,
    interleave,
    median,
    ratio,
    table,
)
from .http import (
    CONNECTIONS,
    NOTES_PER_TENANT,
    UVICORN,
    check_rows,
    load,
    plot,
    seed_notes,
    server,
    wrk_script,
)

TITLE = "10. SQLAlchemy: an ORM select in FastAPI, plain SQLAlchemy vs. tenantpool's TenantSession"

TENANTS = [f"tenant{i}" for i in range(64)]
POOL_SIZE = 10
PLAIN = "plain SQLAlchemy: engine pool + set_config(..., true) per transaction"
TENANTPOOL = "tenantpool, TenantSession"
TENANTPOOL_TX = "tenantpool, TenantSession, state_scope='transaction'"
TENANCY = "fastapi-tenancy 0.5.0, RLS provider"
APPS = {
    PLAIN: "plain_sqlalchemy",
    TENANTPOOL: "tenantpool_session",
    TENANTPOOL_TX: "tenantpool_session_per_transaction",
    TENANCY: "fastapi_tenancy",
}
# The policy reads tenantpool's and plain SQLAlchemy's setting, or fastapi-tenancy's own.
WHO = (
    "coalesce(nullif(current_setting('app.tenant_id', true), ''),"
    " current_setting('app.current_tenant', true))"
)


def tenancy_unavailable() -> str | None:
    """Why fastapi-tenancy 0.5.0 is left out, or None if it can run."""
    try:
        version = metadata.version("fastapi-tenancy")
    except metadata.PackageNotFoundError:
        return "fastapi-tenancy is not installed (pip install fastapi-tenancy==0.5.0)"
    if version != "0.5.0":
        return f"fastapi-tenancy {version} is installed; this scenario pins 0.5.0"
    return None


@contextlib.contextmanager
def setup(ctx: Context, names: list[str]) -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """The shared notes table; yields it and, per contender, its role and DSN."""
    pg = ctx.shared
    table_name = PostgresCluster.unique_name("sa_notes")
    roles = {name: PostgresCluster.unique_name("sa_app") for name in names}
    for role in roles.values():
        pg.create_role_sync(role, password="bench-pw")
    try:
        seed_notes(pg, table_name, list(roles.values()), WHO, TENANTS)
        yield (
            table_name,
            {name: (role, pg.dsn(user=role, password="bench-pw")) for name, role in roles.items()},
        )
    finally:
        pg.execute_sync(f"DROP TABLE IF EXISTS {table_name}")
        for role in roles.values():
            pg.drop_role_sync(role)


def check(name: str, url: str) -> None:
    """Refuse to measure an endpoint that serves any tenant the wrong rows."""
    with httpx.Client(base_url=url, timeout=5) as client:
        check_rows(client, name, TENANTS)


async def measured(
    url: str, seconds: int, script: Path | None, pg: PostgresCluster, role: str
) -> dict[str, Any]:
    """One load, with the contender's server backends: the most at once, and how many new.

    Sampled every 50 ms from this process's own connection: often enough to see a connection
    opened per request, rarely enough not to load the server the contenders share.
    """
    conn = await asyncpg.connect(pg.superuser_dsn)
    pids_sql = "SELECT array_agg(pid) FROM pg_stat_activity WHERE usename = $1"
    try:
        before = set(await conn.fetchval(pids_sql, role) or ())
        seen, most = set(before), len(before)
        loading = asyncio.ensure_future(load(url, seconds, script))
        while not loading.done():
            pids = set(await conn.fetchval(pids_sql, role) or ())
            seen |= pids
            most = max(most, len(pids))
            await asyncio.wait([loading], timeout=0.05)
        result = await loading
    finally:
        await conn.close()
    result["backends"] = most
    result["opened"] = len(seen - before)
    return result


def run(ctx: Context) -> Report:
    seconds, warmup = ctx.pick(3, 5), ctx.pick(1, 2)
    skipped = tenancy_unavailable()
    apps = {name: app for name, app in APPS.items() if not (skipped and name == TENANCY)}
    with tempfile.TemporaryDirectory() as tmp, setup(ctx, list(apps)) as (notes, logins):
        script = wrk_script(tmp, TENANTS)
        base_env = {
            **os.environ,
            "BENCH_SA_TABLE": notes,
            "BENCH_SA_TENANTS": ",".join(TENANTS),
            "BENCH_SA_POOL": str(POOL_SIZE),
        }
        module = "benchmarks._sqlalchemy_apps"
        with contextlib.ExitStack() as servers:
            urls = {
                name: servers.enter_context(
                    server(app, {**base_env, "BENCH_SA_DSN": logins[name][1]}, module)
                )
                for name, app in apps.items()
            }
            for name, url in urls.items():
                check(name, url)

            async def measure() -> dict[str, list[dict[str, Any]]]:
                for url in urls.values():
                    await load(url, warmup, script)
                contenders = {
                    name: partial(measured, url, seconds, script, ctx.shared, logins[name][0])
                    for name, url in urls.items()
                }
                return await interleave(ctx.rounds, contenders)

            results = asyncio.run(measure())

    plain_rounds = [r["rps"] for r in results[PLAIN]]
    summary = {
        name: {
            "rps": median([r["rps"] for r in rounds]),
            # Each round's ratio to plain SQLAlchemy's run of the same round: the machine's
            # drift between rounds (other work on a shared machine) cancels out of each pair.
            "paired": median(
                [ratio(r["rps"], p) for r, p in zip(rounds, plain_rounds, strict=True)]
            ),
            "p50_ms": median([r["p50_ms"] for r in rounds]),
            "p99_ms": median([r["p99_ms"] for r in rounds]),
            "backends": max(r["backends"] for r in rounds),
            "opened": sum(r["opened"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
        }
        for name, rounds in results.items()
    }
    base = summary[PLAIN]["rps"]
    speedup = summary[TENANTPOOL]["paired"]
    errors = sum(s["errors"] for s in summary.values())
    rows = [
        [name, f"{s['rps']:,.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", s["backends"],
         s["opened"], s["errors"], f"{ratio(s['rps'], base):.2f}x", f"{s['paired']:.2f}x"]
        for name, s in summary.items()
    ]  # fmt: skip
    generator = "wrk, 1 thread" if script else "httpx.AsyncClient in a second process"
    notes_text = [
        f"`GET /notes`: an ORM `select` of a tenant's {NOTES_PER_TENANT} rows of a shared table"
        f" under FORCE ROW LEVEL SECURITY, {len(TENANTS)} tenants rotated per request; load"
        f" generator: {generator}, {CONNECTIONS} connections, {seconds} s per round after"
        f" {warmup} s of warm-up per server. uvicorn, one worker each, `{' '.join(UVICORN)}`;"
        f" every pool holds at most {POOL_SIZE} connections. Backends: the most server"
        " connections the contender's role held at once (sampled every 50 ms during its"
        " rounds, max over rounds); opened: connections it opened during its rounds, summed."
        " Req/s, p50 and p99 are medians over rounds; 'vs plain' divides medians, 'paired' is"
        " the median of each round's ratio to plain SQLAlchemy's run of the same round, which"
        " the goal uses: rounds are interleaved, so a pair shares the machine's state.",
    ]
    if skipped:
        notes_text.append(f"fastapi-tenancy left out: {skipped}.")
    if script is None:
        notes_text.append(
            "Without wrk the generator is an httpx client that rotates only the first 8"
            " tenants, and is slower than the servers: it may pull the ratios towards 1."
        )
    if errors:
        notes_text.append(f"**{errors} requests failed**: the goal counts as missed.")
    tenantpool_backends = max(summary[TENANTPOOL]["backends"], summary[TENANTPOOL_TX]["backends"])
    return Report(
        name="sqlalchemy",
        title=TITLE,
        table=table(
            [
                "contender",
                "req/s",
                "p50 ms",
                "p99 ms",
                "backends",
                "opened",
                "errors",
                "vs plain",
                "vs plain, paired",
            ],
            rows,
        ),
        goals=[
            Goal(
                "tenantpool's TenantSession >= 1.0x plain SQLAlchemy in requests per second"
                " (paired), in either state_scope",
                met=max(speedup, summary[TENANTPOOL_TX]["paired"]) >= 1.0 and not errors,
                detail=f"{speedup:.2f}x per session, {summary[TENANTPOOL_TX]['paired']:.2f}x"
                " per transaction",
            ),
            Goal(
                "tenantpool holds no more server connections than any other contender",
                met=all(tenantpool_backends <= s["backends"] for s in summary.values()),
                detail=", ".join(f"{s['backends']}" for s in summary.values()),
            ),
        ],
        data={
            "generator": "wrk" if script else "httpx",
            "connections": CONNECTIONS,
            "pool_size": POOL_SIZE,
            "tenants": len(TENANTS),
            "seconds_per_round": seconds,
            "fastapi_tenancy": skipped or "measured",
            "ratio": speedup,
            "summary": summary,
            "rounds": results,
        },
        notes=notes_text,
        plot=partial(plot, {name: [r["rps"] for r in rounds] for name, rounds in results.items()}),
    )
