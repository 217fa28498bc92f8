"""The hard cap across pools, against the real server: the ceiling, steals, FIFO, wake-ups."""

from __future__ import annotations

import random

import anyio
import pytest
from _postgres import PostgresCluster
from _support import ServerSampler, drained, tenant_dsn, until

from tenantpool import PoolSettings, PoolTimeout, Target, TenantPoolManager

pytestmark = pytest.mark.anyio


def tenants(
    pg: PostgresCluster, login: tuple[str, str], n: int, **pool: object
) -> dict[str, Target]:
    """``n`` tenants, each its own pool (distinct DSNs) on the same server."""
    dsn = pg.dsn(*login)
    settings = PoolSettings(**pool) if pool else None  # type: ignore[arg-type]
    return {f"t{i}": Target(tenant_dsn(dsn, f"t{i}"), pool=settings) for i in range(n)}


def check_accounting(manager: TenantPoolManager, cap: int) -> int:
    """The manager's own view: every pool's connections add up to the slots, within the cap."""
    total = manager.stats().total
    assert total == manager._capacity.total <= cap
    return total


async def backend_pids(pg: PostgresCluster, role: str) -> set[int]:
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1", role)
    return {row["pid"] for row in rows}


async def test_a_burst_over_many_tenants_never_exceeds_the_cap(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    cap, n_tenants, n_checkouts = 20, 300, 1500
    # What is checked is the ceiling, not how fast the burst goes through: a checkout may
    # wait as long as a loaded machine needs (the default 10 s would make this a speed test).
    manager = TenantPoolManager(
        tenants(pg, login, n_tenants),
        max_total_connections=cap,
        pool=PoolSettings(max_size=5, acquire_timeout=600),
    )
    peak_seen = 0
    served: dict[str, int] = {}

    async def checkout(tenant: str) -> None:
        nonlocal peak_seen
        async with manager.with_connection(tenant) as conn:
            peak_seen = max(peak_seen, check_accounting(manager, cap))
            assert await conn.fetchval("SELECT current_setting('application_name')") == tenant
            served[tenant] = served.get(tenant, 0) + 1

    async def watch() -> None:
        # Samples between the checkouts' own checks; a pause, not a spin, so that it does not
        # take the loop from the burst it watches.
        nonlocal peak_seen
        while True:
            peak_seen = max(peak_seen, check_accounting(manager, cap))
            await anyio.sleep(0.001)

    rng = random.Random(7)
    order = [f"t{rng.randrange(n_tenants)}" for _ in range(n_checkouts)]
    with ServerSampler(pg.superuser_dsn, login[0]) as sampler:
        async with manager:
            with anyio.fail_after(900):  # a ceiling against a hang
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    async with anyio.create_task_group() as burst:
                        for tenant in order:
                            burst.start_soon(checkout, tenant)
                    tg.cancel_scope.cancel()
            await drained(manager)
            stats = manager.stats()
    print(
        f"\ncap burst: {n_checkouts} checkouts over {len(served)} tenants at cap {cap}:"
        f" server peak {sampler.peak} in {len(sampler.samples)} samples, manager peak"
        f" {peak_seen}, {stats.steals} steals"
    )
    assert sum(served.values()) == n_checkouts
    assert stats.checkouts == n_checkouts and stats.timeouts == 0
    assert stats.steals > 0
    assert len(sampler.samples) >= 20, "the sampler must have watched the burst"
    assert 0 < sampler.peak <= cap
    assert peak_seen == cap, "the burst should have filled the cap"


async def test_a_checkout_at_the_cap_steals_the_least_recently_used_idle_connection(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    async with TenantPoolManager(tenants(pg, login, 3), max_total_connections=2) as manager:
        pids = {}
        for tenant in ("t0", "t1"):  # t0 idles first: it is the least recently used
            async with manager.with_connection(tenant) as conn:
                pids[tenant] = conn.get_server_pid()
        async with manager.with_connection("t2"):
            check_accounting(manager, 2)
            alive = await backend_pids(pg, login[0])
        assert pids["t0"] not in alive and pids["t1"] in alive
        stats = manager.stats()
        assert stats.steals == 1
        assert stats.total == 2
        assert [p.size for n, p in stats.pools.items() if n.endswith("=t0")] == [0]


async def test_connections_above_min_size_are_stolen_first_but_the_cap_wins(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    targets = tenants(pg, login, 3)
    dsn = pg.dsn(*login)
    # t0 keeps one connection warm: it is at its min_size, t1 is above its own (0).
    targets["t0"] = Target(tenant_dsn(dsn, "t0"), pool=PoolSettings(min_size=1))
    async with TenantPoolManager(targets, max_total_connections=2, reap_interval=0.02) as manager:
        async with manager.with_connection("t0") as conn:
            warm = conn.get_server_pid()
        async with manager.with_connection("t1") as conn:
            cold = conn.get_server_pid()
        async with manager.with_connection("t2"):
            alive = await backend_pids(pg, login[0])
            assert warm in alive and cold not in alive
            # Now only t0's warm connection is idle: the cap wins over its min_size.
            async with manager.with_connection("t1"):
                alive = await backend_pids(pg, login[0])
                assert warm not in alive
                check_accounting(manager, 2)
        assert manager.stats().steals == 2


async def test_waiters_at_the_cap_are_served_first_come_first_served_across_tenants(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    entered: list[str] = []
    names = [f"t{i}" for i in range(6)]
    release = {tenant: anyio.Event() for tenant in names}
    async with TenantPoolManager(tenants(pg, login, 6), max_total_connections=2) as manager:

        async def hold(tenant: str) -> None:
            async with manager.with_connection(tenant) as conn:
                await conn.fetchval("SELECT 1")
                entered.append(tenant)
                await release[tenant].wait()

        async with anyio.create_task_group() as tg:
            for count, tenant in enumerate(names[:2], start=1):
                tg.start_soon(hold, tenant)
                await until(lambda: len(entered) == count)  # noqa: B023
            for queued, tenant in enumerate(names[2:], start=1):
                tg.start_soon(hold, tenant)
                await until(lambda: manager.stats().waiting == queued)  # noqa: B023
            # Each release, in whichever pool, hands the freed capacity to the queue's head.
            for done in range(4):
                release[entered[done]].set()
                await until(lambda: len(entered) == 3 + done)  # noqa: B023
            for tenant in names:
                release[tenant].set()
        assert entered == ["t0", "t1", "t2", "t3", "t4", "t5"]
        await drained(manager)
        check_accounting(manager, 2)


async def test_a_close_wakes_a_waiter_at_the_cap(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    async with TenantPoolManager(tenants(pg, login, 2), max_total_connections=1) as manager:
        async with anyio.create_task_group() as tg:
            got = anyio.Event()

            async def waiter() -> None:
                async with manager.with_connection("t1") as conn:
                    await conn.fetchval("SELECT 1")
                    got.set()

            async with manager.with_connection("t0") as conn:
                pid = conn.get_server_pid()
                tg.start_soon(waiter)
                await until(lambda: manager.stats().waiting == 1)
                # The server drops the holder's connection: its release frees the slot.
                await pg.execute("SELECT pg_terminate_backend($1)", pid)
                await until(conn.is_closed)
            with anyio.fail_after(5):
                await got.wait()
        check_accounting(manager, 1)


async def test_a_wait_at_the_cap_ends_in_pool_timeout_with_a_retry_hint(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    async with TenantPoolManager(
        tenants(pg, login, 2),
        max_total_connections=1,
        pool=PoolSettings(acquire_timeout=0.2),
    ) as manager:
        async with manager.with_connection("t0"):
            with pytest.raises(PoolTimeout) as info:
                async with manager.with_connection("t1"):
                    pass
            assert isinstance(info.value, TimeoutError)
            assert info.value.retry_after > 0
            assert "0.20 sec" in str(info.value)
            stats = manager.stats()
            assert (stats.timeouts, stats.waiting, stats.total) == (1, 0, 1)
        # Nothing was lost: the other tenant gets the slot at once now.
        async with manager.with_connection("t1") as conn:
            assert await conn.fetchval("SELECT 1") == 1
        check_accounting(manager, 1)


async def test_refill_to_min_size_stays_within_the_cap(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    targets = tenants(pg, login, 3, min_size=3, max_size=3)
    async with TenantPoolManager(targets, max_total_connections=5, reap_interval=0.02) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant):
                pass
        await until(lambda: manager.stats().idle == 5)
        await anyio.sleep(0.1)  # several more rounds of the background task
        assert check_accounting(manager, 5) == 5
        assert len(await backend_pids(pg, login[0])) == 5
