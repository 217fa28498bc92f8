"""Targets that fail: backoff with fail-fast checkouts, one probe, isolation, recovery, health."""

from __future__ import annotations

import json
import time

import anyio
import pytest
from _postgres import PostgresCluster
from _support import FakeServer, drained, tenant_dsn, until

from tenantpool import PoolSettings, Target, TenantPoolManager, TenantUnavailable, redact_dsn

pytestmark = pytest.mark.anyio


async def test_checkouts_fail_fast_while_a_target_backs_off_and_one_probe_finds_it_back(
    pg: PostgresCluster,
) -> None:
    async with FakeServer() as down:
        targets = {"down": Target(down.dsn("Hunter2-secret")), "up": Target(pg.dsn())}
        async with TenantPoolManager(targets, reconnect_delay=0.2) as manager:
            with pytest.raises(TenantUnavailable) as first:
                async with manager.with_connection("down"):
                    pass
            assert down.attempts == 1
            # Backing off: turned away at once, with a hint, and no new connection attempt.
            for _ in range(20):
                with pytest.raises(TenantUnavailable) as info:
                    async with manager.with_connection("down"):
                        pass
                assert 0 < info.value.retry_after <= 0.2
            assert down.attempts == 1
            assert manager.stats().connect_errors == 1
            assert "Hunter2-secret" not in str(first.value) + str(info.value)
            (down_stats,) = [p for p in manager.stats().pools.values() if p.backing_off]
            assert down_stats.retry_after > 0
            # Other targets are not slowed.
            async with manager.with_connection("up") as conn:
                assert await conn.fetchval("SELECT 1") == 1
            # Once the delay has passed, many concurrent checkouts make exactly one attempt.
            await anyio.sleep(info.value.retry_after + 0.01)
            results: list[BaseException] = []

            async def try_once() -> None:
                try:
                    async with manager.with_connection("down"):
                        pass
                except TenantUnavailable as exc:
                    results.append(exc)

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(try_once)
            assert len(results) == 10
            assert down.attempts == 2
            await drained(manager)


async def test_a_hanging_target_does_not_slow_others(pg: PostgresCluster) -> None:
    async with FakeServer(hang=True) as hung:
        targets = {"hung": Target(hung.dsn()), "up": Target(pg.dsn())}
        async with TenantPoolManager(
            targets, pool=PoolSettings(connect_timeout=1.0), close_timeout=0.5
        ) as manager:
            async with anyio.create_task_group() as tg:
                failed = anyio.Event()

                async def stuck() -> None:
                    with pytest.raises(TenantUnavailable):
                        async with manager.with_connection("hung"):
                            pass
                    failed.set()

                tg.start_soon(stuck)
                await until(lambda: hung.attempts == 1)
                for _ in range(20):
                    async with manager.with_connection("up") as conn:
                        assert await conn.fetchval("SELECT 1") == 1
                assert not failed.is_set(), "the healthy tenant was served while one hangs"
            assert manager.stats().connect_errors == 1


async def test_close_is_bounded_with_a_connect_hanging(pg: PostgresCluster) -> None:
    async with FakeServer(hang=True) as hung:
        manager = TenantPoolManager({"hung": Target(hung.dsn())}, close_timeout=0.2)
        await manager.start()
        errors: list[BaseException] = []

        async def stuck() -> None:
            try:
                async with manager.with_connection("hung"):
                    pass
            except BaseException as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await until(lambda: hung.attempts == 1)
            with anyio.fail_after(3):
                await manager.close()
        assert [type(e).__name__ for e in errors] == ["ManagerClosed"]
        assert manager.stats().total == 0


async def test_every_pool_recovers_by_itself_after_a_server_restart(
    restartable_pg: PostgresCluster, login_dsn: str
) -> None:
    pg = restartable_pg
    n = 30
    targets = {f"t{i}": Target(tenant_dsn(login_dsn, f"t{i}")) for i in range(n)}
    settings = PoolSettings(min_size=1, connect_timeout=2)
    async with TenantPoolManager(targets, pool=settings, reap_interval=0.05) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant):
                pass
        await until(lambda: manager.stats().idle == n)
        await anyio.to_thread.run_sync(pg.stop)
        # While it is down: fast failures, no hang, nothing left checked out.
        with anyio.fail_after(5):
            for tenant in targets:
                with pytest.raises(TenantUnavailable):
                    async with manager.with_connection(tenant):
                        pass
        assert manager.stats().in_use == 0
        await anyio.to_thread.run_sync(pg.start_again)
        back = time.monotonic()
        # The background task probes each target and refills min_size on its own.
        await until(lambda: manager.stats().idle == n and not manager.stats().backing_off, 10)
        refilled = time.monotonic() - back
        with anyio.fail_after(5):
            for tenant in targets:
                async with manager.with_connection(tenant) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
        recovered = time.monotonic() - back
        await drained(manager)
        stats = manager.stats()
        assert stats.in_use == 0 and stats.total == n
    print(
        f"\nrestart: {n} tenants refilled {refilled:.2f} s and all served {recovered:.2f} s"
        f" after the server was back; {stats.connect_errors} failed attempts in the outage"
    )


async def test_health_verdicts(pg: PostgresCluster) -> None:
    async with FakeServer() as down:
        secret = "Hunter2-secret"
        targets = {"down": Target(down.dsn(secret)), "up": Target(pg.dsn())}
        manager = TenantPoolManager(targets, max_total_connections=1, reconnect_delay=5.0)
        assert (await manager.health()).status == "failing"  # not started
        async with manager:
            report = await manager.health()
            assert (report.status, report.reasons, report.background_task) == ("ok", (), "running")
            async with manager.with_connection("up"):
                pass
            with pytest.raises(TenantUnavailable):
                async with manager.with_connection("down"):
                    pass
            report = await manager.health()
            assert report.status == "degraded"
            assert report.backing_off == (redact_dsn(down.dsn(secret)),)
            assert report.reasons == ("1 of 2 targets are backing off",)
            # Waiters piling up: the cap of 1 is held and another checkout waits past 1 s.
            async with anyio.create_task_group() as tg:
                async with manager.with_connection("up"):
                    tg.start_soon(checkout, manager, "up")
                    await until(lambda: manager.stats().waiting == 1)
                    await anyio.sleep(1.05)
                    report = await manager.health()
                assert report.waiting == 1 and report.longest_wait >= 1.0
                assert any("waiting" in reason for reason in report.reasons)
            data = report.as_dict()
            text = json.dumps(data)
            assert secret not in text and pg.superuser_password not in text
            assert data["status"] == "degraded" and data["max_total"] == 1
        report = await manager.health()
        assert report.status == "failing" and "the manager is closed" in report.reasons


async def test_every_target_down_is_failing() -> None:
    async with (
        FakeServer() as a,
        FakeServer() as b,
        TenantPoolManager({"a": Target(a.dsn()), "b": Target(b.dsn())}) as manager,
    ):
        for tenant in ("a", "b"):
            with pytest.raises(TenantUnavailable):
                async with manager.with_connection(tenant):
                    pass
        report = await manager.health()
        assert report.status == "failing"
        assert report.reasons == ("every known target is down (2)",)


async def checkout(manager: TenantPoolManager, tenant: str) -> None:
    async with manager.with_connection(tenant):
        pass
