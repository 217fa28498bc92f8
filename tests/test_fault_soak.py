"""A soak of mixed faults, off by default: ``TENANTPOOL_SOAK=60 python -m pytest
tests/test_fault_soak.py -s`` (the value is its length in seconds).

Workers check out four tenants over two pools through the fault proxy, under a cap, while a
driver injects one fault after another -- black-hole, reset, slow link, refused connects,
server-side terminations, cancelled workers -- each held until the load shows it (an error, or
progress for a slow link). Afterwards: nothing in use, every backend idle, memory (live scopes,
proxies and asyncpg connections), pools and tasks back to their baseline.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import random
import time

import anyio
import asyncpg
import pytest
from _faults import FaultProxy, FaultSampler, server_until
from _postgres import PostgresCluster
from _support import drained, tenant_dsn, until
from test_faults import CLEAN_ERRORS

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool._scope import Scope, TenantConnection

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not os.environ.get("TENANTPOOL_SOAK"), reason="a soak: set TENANTPOOL_SOAK=<seconds>"
    ),
]

TENANTS = ("acme", "globex", "initech", "umbrella")
CAP = 5


def live(kind: type) -> int:
    # By type, not isinstance: asyncpg counts every proxy as a Connection too.
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def all_idle(pg: PostgresCluster, role: str) -> bool:
    rows = await pg.fetch("SELECT state FROM pg_stat_activity WHERE usename = $1", role)
    return all(r["state"] == "idle" for r in rows)


async def test_a_soak_of_mixed_faults_leaves_everything_at_its_baseline(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    seconds = float(os.environ.get("TENANTPOOL_SOAK") or 60)
    role = login[0]
    rng = random.Random(os.environ.get("TENANTPOOL_SOAK_SEED", "14"))
    gc.collect()
    baseline_tasks = len(asyncio.all_tasks())
    baseline = {kind: live(kind) for kind in (Scope, TenantConnection, asyncpg.Connection)}
    faults: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    async with FaultProxy(pg.dsn(*login), delay=0.01) as proxy:
        resolver = {
            t: Target(
                tenant_dsn(proxy.dsn, "soak_b") if t in ("initech", "umbrella") else proxy.dsn,
                settings={"app.tenant_id": t},
            )
            for t in TENANTS
        }
        manager = TenantPoolManager(
            resolver,
            max_total_connections=CAP,
            pool=PoolSettings(max_size=3, acquire_timeout=3, connect_timeout=1),
            reconnect_delay=0.05,
            reconnect_delay_max=0.5,
            close_timeout=2,
        )
        with FaultSampler(pg.superuser_dsn, role) as sampler:
            async with manager:

                async def worker(n: int) -> None:
                    nonlocal done
                    wrng = random.Random(n)
                    while True:
                        tenant = wrng.choice(TENANTS)
                        try:
                            async with manager.with_connection(tenant) as conn:
                                got = await conn.fetchval(
                                    "SELECT current_setting('app.tenant_id')", timeout=2
                                )
                                assert got == tenant
                                if wrng.random() < 0.3:
                                    async with conn.transaction():
                                        await conn.execute("SELECT pg_advisory_xact_lock(14)")
                            done += 1
                        except CLEAN_ERRORS as exc:
                            errors[type(exc).__name__] += 1
                            await anyio.sleep(0.01)

                workers = {n: asyncio.create_task(worker(n)) for n in range(12)}

                async def shows(kind: str) -> None:
                    """Hold a fault until the load shows it."""
                    if kind == "slow":
                        target = done + 20
                        await until(lambda: done >= target, 60)
                    else:
                        target = sum(errors.values()) + 1
                        await until(lambda: sum(errors.values()) >= target, 60)

                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    kind = rng.choice(
                        ["blackhole", "reset", "slow", "refuse", "terminate", "cancel"]
                    )
                    faults[kind] += 1
                    if kind == "terminate":
                        rows = await pg.fetch(
                            "SELECT pid FROM pg_stat_activity WHERE usename = $1", role
                        )
                        sampler.excluded.update(r["pid"] for r in rows)
                        await pg.fetch(
                            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                            [r["pid"] for r in rows],
                        )
                    elif kind == "cancel":
                        for n in rng.sample(sorted(workers), 4):
                            workers[n].cancel()
                            workers[n] = asyncio.create_task(worker(n))
                    else:
                        await proxy.set_mode(kind)  # type: ignore[arg-type]
                        await shows(kind)
                        await proxy.set_mode("pass")
                    await until(lambda progress=done + 50: done >= progress, 60)

                # Nothing here may keep a worker task (a loop variable did): a cancelled task
                # keeps its CancelledError, whose traceback keeps the frames it went through,
                # and those of a query (asyncpg's, tenantpool's) keep its connection.
                for n in workers:
                    workers[n].cancel()
                await asyncio.gather(*workers.values(), return_exceptions=True)
                await drained(manager, limit=30)
                stats = manager.stats()
                assert stats.in_use == 0 and stats.waiting == 0 and stats.total <= CAP
                await server_until(lambda: all_idle(pg, role))
    del workers
    gc.collect()
    after = {kind: live(kind) for kind in (Scope, TenantConnection, asyncpg.Connection)}
    assert len(asyncio.all_tasks()) == baseline_tasks
    # Ended scopes may stay reachable from asyncpg's timers, but hold nothing.
    assert all(s.pool is None and s.task is None for s in gc.get_objects() if isinstance(s, Scope))
    assert after[asyncpg.Connection] == baseline[asyncpg.Connection], after
    # Those scopes' proxies are all there is of them, and are released.
    assert after[TenantConnection] == after[Scope], after
    assert all(c._raw is None for c in gc.get_objects() if type(c) is TenantConnection)
    assert sampler.peak <= CAP
    # A connection lost under a scope is TenantUnavailable; a query's own timeout=, TimeoutError.
    assert set(errors) <= {"TenantUnavailable", "PoolTimeout", "TimeoutError"}, errors
    print(
        f"\nsoak {seconds:.0f} s: {done} checkouts, faults {dict(faults)},"
        f" errors {dict(errors)}, server peak {sampler.peak} of cap {CAP},"
        f" live after {after} (baseline {baseline})"
    )
