"""Tenant-level control: the resolver cache and ``invalidate``, quotas (``max_in_use``),
``expire``; against the real cluster."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from _postgres import PostgresCluster
from _support import drained, open_together, until

from tenantpool import (
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolManager,
    UnknownTenant,
)
from tenantpool._resolver_cache import UNKNOWN_TTL, ResolverCache
from tenantpool._tenant import TenantResolver

pytestmark = pytest.mark.anyio


class CountingResolver:
    """An async resolver over a dict that counts its calls and can be held mid-call."""

    def __init__(self, targets: dict[str, Target]) -> None:
        self.targets = targets
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail_next: BaseException | None = None

    async def __call__(self, tenant: str) -> Target | None:
        self.calls += 1
        await self.release.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.targets.get(tenant)


def rls(dsn: str, *tenants: str, **kwargs: object) -> dict[str, Target]:
    return {t: Target(dsn, settings={"app.tenant_id": t}, **kwargs) for t in tenants}  # type: ignore[arg-type]


# -- the resolver cache ----------------------------------------------------------------------


async def test_a_resolved_tenant_is_reused_and_invalidate_asks_again(pg: PostgresCluster) -> None:
    resolver = CountingResolver(rls(pg.dsn(), "acme"))
    async with TenantPoolManager(resolver) as manager:
        for _ in range(10):
            async with manager.with_connection("acme"):
                pass
        assert resolver.calls == 1
        manager.invalidate("acme")
        async with manager.with_connection("acme"):
            pass
        assert resolver.calls == 2
        manager.invalidate()  # every tenant
        await manager.resolve("acme")
        assert resolver.calls == 3


async def test_concurrent_lookups_of_one_tenant_share_one_call(pg: PostgresCluster) -> None:
    resolver = CountingResolver(rls(pg.dsn(), "acme"))
    resolver.release.clear()
    async with TenantPoolManager(resolver, pool=PoolSettings(max_size=5)) as manager:

        async def scope() -> None:
            async with manager.with_connection("acme") as conn:
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == "acme"

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(scope)
            # One caller gives up mid-lookup: the others' lookup goes on.
            with anyio.move_on_after(0.01):
                await manager.resolve("acme")
            await until(lambda: resolver.calls >= 1)
            resolver.release.set()
        assert resolver.calls == 1


async def test_unknown_tenants_are_remembered_briefly_and_errors_not_at_all(
    pg: PostgresCluster,
) -> None:
    resolver = CountingResolver(rls(pg.dsn(), "acme"))
    async with TenantPoolManager(resolver) as manager:
        for _ in range(3):
            with pytest.raises(UnknownTenant):
                await manager.resolve("ghost")
        assert resolver.calls == 1
        # Created meanwhile: invalidate makes it known at once.
        resolver.targets["ghost"] = Target(pg.dsn())
        manager.invalidate("ghost")
        await manager.resolve("ghost")
        assert resolver.calls == 2
        resolver.fail_next = RuntimeError("registry down")
        with pytest.raises(RuntimeError, match="registry down"):
            await manager.resolve("acme")
        await manager.resolve("acme")
        assert resolver.calls == 4


def test_entries_expire_after_their_ttl() -> None:
    now = [0.0]
    targets = {"acme": Target("postgresql://app@db/app")}
    calls: list[str] = []

    async def resolve(tenant: str) -> Target | None:
        calls.append(tenant)
        return targets.get(tenant)

    cache = ResolverCache(TenantResolver(resolve), 30.0, clock=lambda: now[0])

    async def main() -> None:
        await cache.resolve("acme")
        with pytest.raises(UnknownTenant):
            await cache.resolve("ghost")
        now[0] = UNKNOWN_TTL + 0.1  # the unknown one is asked again, the known one is not
        await cache.resolve("acme")
        with pytest.raises(UnknownTenant):
            await cache.resolve("ghost")
        assert calls == ["acme", "ghost", "ghost"]
        now[0] = 31.0
        await cache.resolve("acme")
        assert calls == ["acme", "ghost", "ghost", "acme"]
        cache.purge(now[0] + 100)
        assert len(cache) == 0

    asyncio.run(main())


async def test_resolver_ttl_zero_and_mappings_are_read_every_time(pg: PostgresCluster) -> None:
    resolver = CountingResolver(rls(pg.dsn(), "acme"))
    async with TenantPoolManager(resolver, resolver_ttl=0) as manager:
        for _ in range(3):
            await manager.resolve("acme")
        assert resolver.calls == 3
    mapping = rls(pg.dsn(), "acme")
    async with TenantPoolManager(mapping) as manager:
        await manager.resolve("acme")
        del mapping["acme"]
        with pytest.raises(UnknownTenant):
            await manager.resolve("acme")
    with pytest.raises(ValueError, match="resolver_ttl"):
        TenantPoolManager(mapping, resolver_ttl=-1)


# -- quotas ----------------------------------------------------------------------------------


def test_max_in_use_is_checked() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_in_use"):
            Target("postgresql://app@db/app", max_in_use=bad)  # type: ignore[arg-type]
    assert "max_in_use=3" in repr(Target("postgresql://app@db/app", max_in_use=3))


async def test_a_tenant_at_its_quota_waits_and_others_pass(pg: PostgresCluster) -> None:
    targets = {**rls(pg.dsn(), "noisy", max_in_use=2), **rls(pg.dsn(), "quiet")}
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=10)) as manager:
        holding = 0
        peak = 0
        gate = anyio.Event()

        async def noisy() -> None:
            nonlocal holding, peak
            async with manager.with_connection("noisy") as conn:
                holding += 1
                peak = max(peak, holding)
                await gate.wait()
                # A nested scope of the same tenant takes no second place.
                async with manager.with_connection("noisy") as again:
                    assert again is conn
                holding -= 1

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(noisy)
            await until(lambda: holding == 2 and manager.stats().quota_waiting == 4)
            # The pool has room: another tenant is not held back by noisy's queue.
            with anyio.fail_after(5):
                async with manager.with_connection("quiet") as conn:
                    assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == "quiet"
            assert manager.stats().in_use == 2
            gate.set()
        assert peak == 2
        stats = manager.stats()
        assert stats.quota_waits == 4 and stats.quota_waiting == 0
        await drained(manager)


async def test_a_quota_wait_times_out_and_a_cancelled_one_leaves_no_place_behind(
    pg: PostgresCluster,
) -> None:
    targets = rls(pg.dsn(), "acme", max_in_use=1)
    async with TenantPoolManager(targets, pool=PoolSettings(acquire_timeout=0.2)) as manager:

        async def other_task_checks_out() -> None:
            # A task of its own: in this one, a nested scope of acme would reuse ours.
            async with manager.with_connection("acme"):
                pass

        async with manager.with_connection("acme"):
            with pytest.raises(PoolTimeout, match="max_in_use of 1"):
                await asyncio.create_task(other_task_checks_out())
            assert manager.stats().timeouts == 1
            waiter = asyncio.create_task(other_task_checks_out())
            await until(lambda: manager.stats().quota_waiting == 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert manager._quotas.held("acme") == 0
        await asyncio.create_task(other_task_checks_out())
        assert manager._quotas.held("acme") == 0


# -- expire ----------------------------------------------------------------------------------


async def pids(manager: TenantPoolManager, tenant: str, n: int) -> set[int]:
    """The backends of ``n`` scopes of ``tenant`` held at once."""
    return set(await open_together(manager, tenant, n))


async def server_pids(pg: PostgresCluster) -> set[int]:
    return {r["pid"] for r in await pg.fetch("SELECT pid FROM pg_catalog.pg_stat_activity")}


def acme_pool(manager: TenantPoolManager) -> str:
    (name,) = (n for n in manager.stats().pools if "globex" not in n)
    return name


async def test_expire_replaces_idle_connections_now_and_busy_ones_at_release(
    pg: PostgresCluster,
) -> None:
    targets = {
        "acme": Target(pg.dsn(), settings={"app.tenant_id": "acme"}),
        "globex": Target(f"{pg.dsn()}?application_name=globex"),
    }
    async with TenantPoolManager(targets, pool=PoolSettings(max_size=3)) as manager:
        before = await pids(manager, "acme", 2)
        (globex_pid,) = await pids(manager, "globex", 1)
        await drained(manager)
        async with manager.with_connection("acme") as busy:
            busy_pid = busy.get_server_pid()
            await manager.expire("acme")
            # The idle one has been closed (the server ends its backend a moment later);
            # the busy one still works.
            assert manager.stats().pools[acme_pool(manager)].size == 1
            with anyio.fail_after(10):
                while (before - {busy_pid}) & await server_pids(pg):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert await busy.fetchval("SELECT 1") == 1
        await drained(manager)
        after = await pids(manager, "acme", 2)
        assert not after & before
        assert await pids(manager, "globex", 1) == {globex_pid}
        await manager.expire()
        await drained(manager)
        assert not await pids(manager, "globex", 1) & {globex_pid}


async def test_expire_after_a_password_rotation_moves_the_tenant_to_its_new_credentials(
    pg: PostgresCluster, login: tuple[str, str]
) -> None:
    user, old_password = login
    targets = {"acme": Target(pg.dsn(user, old_password))}
    resolver = CountingResolver(targets)
    async with TenantPoolManager(resolver) as manager:
        async with manager.with_connection("acme"):
            pass
        await pg.execute(f"ALTER ROLE {user} PASSWORD 'rotated-pw'")
        targets["acme"] = Target(pg.dsn(user, "rotated-pw"))
        await manager.expire("acme")
        async with manager.with_connection("acme") as conn:
            assert await conn.fetchval("SELECT current_user") == user
        await drained(manager)
        sizes = sorted(p.size for p in manager.stats().pools.values())
        assert sizes == [0, 1]  # the old pool holds nothing, the new one its connection


@pytest.mark.parametrize("ttl", [0.0, 60.0])
async def test_a_resolvers_own_timeout_is_its_error_not_a_pool_timeout(
    pg: PostgresCluster, ttl: float
) -> None:
    async def resolver(tenant: str) -> Target:
        raise TimeoutError("the registry's query timed out")

    async with TenantPoolManager(resolver, resolver_ttl=ttl) as manager:
        with pytest.raises(TimeoutError, match="registry") as info:
            async with manager.with_connection("acme"):
                pass
        assert not isinstance(info.value, PoolTimeout)
