"""Behind a real PgBouncer: tenant state per transaction is safe in transaction pooling, and
one PgBouncer caps the connections of many processes.

PgBouncer in transaction pooling hands each transaction whichever server connection is free,
so anything a client leaves on a server session reaches other clients. These tests run tens of
tasks over a PgBouncer pool of two server connections, each checkout checking every part of its
tenant's state and the rows it may see.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from _pgbouncer import PgBouncer
from _postgres import PostgresCluster
from _support import ServerSampler, drained
from _tenancy import Tenancy, observed

from tenantpool import PoolSettings, TenantPoolManager

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
# Settings PgBouncer itself sets on its server connections to match each client's.
POOLER_SETTINGS = (
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "standard_conforming_strings",
    "TimeZone",
)
SERVER_SESSION_SQL = """
SELECT (SELECT pg_catalog.array_agg(name::text ORDER BY name) FROM pg_catalog.pg_settings
         WHERE source = 'session' AND name <> ALL($1::text[])) AS settings,
       pg_catalog.current_setting('app.tenant_id', true) AS tenant_setting,
       pg_catalog.current_schema()::text AS schema,
       current_user::text AS role,
       (SELECT count(*) FROM pg_catalog.pg_prepared_statements) AS prepared,
       (SELECT count(*) FROM pg_catalog.pg_locks
         WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) AS advisory_locks,
       pg_catalog.pg_backend_pid() AS pid
"""


@pytest.fixture(scope="module")
async def world(pg: PostgresCluster) -> AsyncIterator[Tenancy]:
    world = await Tenancy(pg, 4).create()
    yield world
    await world.drop()


@pytest.fixture
def bouncer(pg: PostgresCluster, world: Tenancy, pgbouncer_binary: str) -> Iterator[PgBouncer]:
    with PgBouncer(pg, {world.login: world.password}) as bouncer:
        yield bouncer


async def load(
    manager: TenantPoolManager, world: Tenancy, *, tasks: int, checkouts: int
) -> dict[str, int]:
    """``tasks`` tasks of ``checkouts`` checkouts each over every tenant, each one checked."""
    counts = {"ok": 0, "mismatch": 0}
    errors: list[str] = []

    async def task(n: int) -> None:
        for i in range(checkouts):
            tenant = world.tenants[(n + i) % len(world.tenants)]
            try:
                async with manager.with_connection(tenant) as conn:
                    row = observed(await conn.fetchrow(world.check_sql))
                    # A second statement in the same scope must still be the same tenant's.
                    again = observed(await conn.fetchrow(world.check_sql))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            good = row == again == world.expected(tenant)
            counts["ok" if good else "mismatch"] += 1

    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(task, n)
    counts["errors"] = len(errors)
    if errors:
        print(f"first errors: {errors[:3]}")
    return counts


async def server_sessions(
    bouncer: PgBouncer, world: Tenancy, pg: PostgresCluster
) -> list[dict[str, Any]]:
    """What a plain client finds on every server connection PgBouncer holds for the login user.

    Each reader holds a transaction open until all have theirs, so no two share a server
    connection; as many readers as PgBouncer has server connections reach all of them.
    """
    size = int(bouncer.settings["default_pool_size"])
    readers = [
        await asyncpg.connect(bouncer.dsn(world.login, world.password), statement_cache_size=0)
        for _ in range(size)
    ]
    try:
        for reader in readers:
            await reader.execute("BEGIN")
        rows = [dict(await r.fetchrow(SERVER_SESSION_SQL, list(POOLER_SETTINGS))) for r in readers]
        for reader in readers:
            await reader.execute("COMMIT")
    finally:
        for reader in readers:
            await reader.close()
    backends = await pg.fetch(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE usename = $1", world.login
    )
    assert {r["pid"] for r in rows} == {b["pid"] for b in backends}
    return rows


def assert_clean(session: dict[str, Any], world: Tenancy) -> None:
    assert session["settings"] is None, session
    assert session["tenant_setting"] in (None, ""), session
    assert session["schema"] == "public", session
    assert session["role"] == world.login, session
    assert session["prepared"] == 0, session
    assert session["advisory_locks"] == 0, session


async def test_transaction_scope_through_transaction_pooling_never_shows_another_tenant(
    pg: PostgresCluster, world: Tenancy, bouncer: PgBouncer
) -> None:
    dsn = bouncer.dsn(world.login, world.password)
    pool = PoolSettings(max_size=10, acquire_timeout=30, state_scope="transaction")
    async with TenantPoolManager(world.targets(dsn), pool=pool) as manager:
        counts = await load(manager, world, tasks=30, checkouts=100)
        await drained(manager)
    print(f"through PgBouncer (transaction pooling, 2 server connections): {counts}")
    assert counts == {"ok": 3000, "mismatch": 0, "errors": 0}
    sessions = await server_sessions(bouncer, world, pg)
    assert len(sessions) == 2
    for session in sessions:
        assert_clean(session, world)


async def test_the_check_catches_session_state_leaking_through_transaction_pooling(
    pg: PostgresCluster, world: Tenancy, bouncer: PgBouncer
) -> None:
    """The same load in session scope: the leak this mode exists to prevent is real and seen."""
    dsn = bouncer.dsn(world.login, world.password)
    pool = PoolSettings(max_size=10, acquire_timeout=30)
    async with TenantPoolManager(
        world.targets(dsn), pool=pool, connect_kwargs={"statement_cache_size": 0}
    ) as manager:
        counts = await load(manager, world, tasks=30, checkouts=20)
    print(f"session scope through transaction pooling: {counts}")
    assert counts["mismatch"] + counts["errors"] > 0


async def test_session_scope_through_session_pooling_still_works(
    world: Tenancy, bouncer: PgBouncer
) -> None:
    dsn = bouncer.dsn(world.login, world.password, session=True)
    # Session pooling gives each client connection a server connection of its own, so the
    # pool must fit in PgBouncer's.
    pool = PoolSettings(max_size=2, acquire_timeout=30)
    async with TenantPoolManager(world.targets(dsn), pool=pool) as manager:
        counts = await load(manager, world, tasks=10, checkouts=50)
    assert counts == {"ok": 500, "mismatch": 0, "errors": 0}


@pytest.fixture
async def many_tenants(pg: PostgresCluster) -> AsyncIterator[Tenancy]:
    world = await Tenancy(pg, 24).create()
    yield world
    await world.drop()


async def test_one_pgbouncer_caps_the_server_connections_of_many_processes(
    pg: PostgresCluster, many_tenants: Tenancy, pgbouncer_binary: str
) -> None:
    """Three processes, each with its own manager and a cap of 4 (12 in all), over 24 tenants
    with a pool each, through one PgBouncer allowed 3 server connections."""
    world = many_tenants
    settings = {"default_pool_size": "3", "max_db_connections": "3"}
    with PgBouncer(pg, {world.login: world.password}, settings=settings) as bouncer:
        await _many_processes(pg, bouncer, world)


async def _many_processes(pg: PostgresCluster, bouncer: PgBouncer, world: Tenancy) -> None:
    tenants = {
        t: {
            # application_name makes a pool per tenant in each process: the cap is exercised.
            "dsn": f"{bouncer.dsn(world.login, world.password)}?application_name={t}",
            "settings": {"app.tenant_id": t},
            "schema": world.schema(t),
            "role": world.role(t),
            "expected": list(world.expected(t)),
        }
        for t in world.tenants
    }
    config = {
        "tenants": tenants,
        "check_sql": world.check_sql,
        "cap": 4,
        "max_size": 2,
        "acquire_timeout": 60,
        "tasks": 12,
        "checkouts_per_task": 40,
        "hold": 0.002,
    }
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(TESTS / "_pooler_worker.py"),
            json.dumps({**config, "seed": n}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for n in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            with anyio.fail_after(60):
                assert (await proc.stdout.readline()).strip() == b"ready"
        with ServerSampler(pg.superuser_dsn, world.login) as sampler:
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            with anyio.fail_after(240):
                outputs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    print(f"3 processes through PgBouncer: {results}; server peak {sampler.peak}")
    assert all(proc.returncode == 0 for proc in procs)
    assert sampler.peak <= 3
    for result in results:
        assert result["errors"] == []
        assert result["mismatches"] == 0
        assert result["ok"] + result["timeouts"] == 12 * 40
    # Nothing here overloads three server connections for a minute: every checkout got through.
    assert sum(r["ok"] for r in results) == 3 * 12 * 40
