"""A cancellation storm: hundreds of scopes cancelled at random points, then a clean slate.

Workers wait for a connection, run queries, nest another tenant's scope, hold advisory locks
and transactions, and leave; half of them are cancelled a random number of loop turns after a
point drawn for each (counted in loop turns, not seconds: the same points under load), so the
cancellations land while waiting, mid-query, nested and on the way out. Afterwards nothing is
in use, every backend is ``idle`` (not ``idle in transaction``), no advisory lock is held, and
each tenant's next checkout carries exactly its own state.
"""

from __future__ import annotations

import asyncio
import random

import anyio
import asyncpg
import pytest
from _faults import server_until
from _postgres import PostgresCluster
from _support import drained, tenant_dsn
from test_isolation import fresh_baseline, leftovers

from tenantpool import PoolSettings, Target, TenantPoolManager

pytestmark = pytest.mark.anyio

# globex has no flavour: a checkout of globex after acme must not see acme's.
STATE = {
    "acme": {"app.tenant_id": "acme", "app.flavour": "acme-flavour"},
    "globex": {"app.tenant_id": "globex"},
    "initech": {"app.tenant_id": "initech", "app.flavour": "initech-flavour"},
}
WORKERS = 240


async def own_state_exactly(conn: asyncpg.Connection, tenant: str) -> None:
    for name in ("app.tenant_id", "app.flavour"):
        value = await conn.fetchval("SELECT current_setting($1, true)", name)
        assert (value or None) == STATE[tenant].get(name), (tenant, name, value)


async def backend_states(pg: PostgresCluster, role: str) -> list[str | None]:
    rows = await pg.fetch("SELECT state FROM pg_stat_activity WHERE usename = $1", role)
    return [r["state"] for r in rows]


@pytest.mark.parametrize("state_scope", ["session", "transaction"])
async def test_a_cancellation_storm_leaves_nothing_in_use_locked_or_in_a_transaction(
    pg: PostgresCluster, login: tuple[str, str], state_scope: str
) -> None:
    role = login[0]
    dsn = pg.dsn(*login)
    per_tx = state_scope == "transaction"
    resolver = {
        # Two tenants share a pool, the third has one of its own: nesting crosses pools.
        t: Target(tenant_dsn(dsn, "storm_b") if t == "initech" else dsn, settings=STATE[t])
        for t in STATE
    }
    clean, _ = await fresh_baseline(dsn)
    rng = random.Random(f"storm-{state_scope}")
    tenants = sorted(STATE)
    counts = {"completed": 0, "cancelled": 0}
    errors: list[BaseException] = []

    # Half the workers are victims: each is cancelled a few loop turns after it reaches a
    # point drawn for it (if its path passes there), so the cancellation lands around it.
    points = ["waiting", "query", "lock", "transaction", "nested", "out"]
    victims = {
        n: (rng.choice(points), rng.randrange(4)) for n in rng.sample(range(WORKERS), WORKERS // 2)
    }
    hit: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()

    def later(turns: int, task: asyncio.Task[None]) -> None:
        if turns:
            loop.call_soon(later, turns - 1, task)
        else:
            task.cancel()

    def reached(n: int, point: str) -> None:
        victim = victims.get(n)
        if victim is not None and victim[0] == point:
            del victims[n]
            hit[point] = hit.get(point, 0) + 1
            later(victim[1], tasks[n])

    async def worker(n: int) -> None:
        wrng = random.Random(n)
        tenant = wrng.choice(tenants)
        for _ in range(wrng.randint(1, 3)):
            reached(n, "waiting")
            async with manager.with_connection(tenant) as conn:
                await own_state_exactly(conn, tenant)
                kind = wrng.choice(["query", "lock", "transaction", "nested", "out"])
                reached(n, kind)
                key = wrng.randrange(1 << 20)
                if kind == "query":
                    await conn.execute("SELECT pg_sleep(0.01)")
                elif kind == "lock":
                    # Per transaction a session lock would stay by design (docs/deployment.md).
                    lock = "pg_advisory_xact_lock" if per_tx else "pg_advisory_lock"
                    await conn.execute(f"SELECT {lock}($1), pg_sleep(0.01)", key)
                elif kind == "transaction":
                    async with conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
                        await conn.execute("SELECT pg_sleep(0.01)")
                elif kind == "nested" and tenant != "initech":
                    # Only into the other pool, which never nests back: holders of one pool
                    # waiting for another of the same would deadlock by design.
                    async with manager.with_connection("initech") as inner:
                        await own_state_exactly(inner, "initech")
                        await inner.execute("SELECT pg_sleep(0.01)")
                    await own_state_exactly(conn, tenant)
                reached(n, "out")

    async def run(seed: int) -> None:
        try:
            await worker(seed)
            counts["completed"] += 1
        except asyncio.CancelledError:
            counts["cancelled"] += 1
            raise
        except Exception as exc:  # reported below: a cancellation must not cost another scope
            errors.append(exc)

    settings = PoolSettings(max_size=4, acquire_timeout=60, state_scope=state_scope)
    async with TenantPoolManager(resolver, pool=settings, max_total_connections=8) as manager:
        tasks.extend(asyncio.create_task(run(n)) for n in range(WORKERS))
        with anyio.fail_after(120):
            await asyncio.gather(*tasks, return_exceptions=True)
        assert not errors, errors[:3]
        assert sum(counts.values()) == WORKERS

        await drained(manager, limit=30)
        stats = manager.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        # A backend whose query was cancelled with its connection closed ends on its own.
        states: list[str | None] = []

        async def all_idle() -> bool:
            states[:] = await backend_states(pg, role)
            return states == ["idle"] * stats.total

        await server_until(all_idle)
        assert not await pg.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND a.usename = $1",
            role,
        )
        for tenant in tenants:
            async with manager.with_connection(tenant) as conn:
                await own_state_exactly(conn, tenant)
                if not per_tx:
                    assert await leftovers(conn) == clean
        checkouts = manager.stats().checkouts
    print(
        f"\nstorm ({state_scope}): {WORKERS} workers, {checkouts} checkouts, {counts},"
        f" cancelled at {hit}, {len(states)} backends idle after"
    )
