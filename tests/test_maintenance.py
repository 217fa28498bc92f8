"""The background task: reaping, jittered recycling, keepalive, refill, forgetting, isolation."""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import weakref

import anyio
import pytest
from _postgres import PostgresCluster
from _support import drained, open_together, tenant_dsn, until

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool._pool import Pool

pytestmark = pytest.mark.anyio


def quiet(**duty: float | None) -> PoolSettings:
    """Settings where only the duty under test closes or pings connections."""
    off: dict[str, float | None] = {
        "idle_timeout": None,
        "max_age": None,
        "keepalive_interval": None,
    }
    return PoolSettings(**{**off, **duty})  # type: ignore[arg-type]


async def alive(pg: PostgresCluster, pids: list[int]) -> set[int]:
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
    return {row["pid"] for row in rows}


async def test_idle_connections_are_reaped_down_to_min_size(login_dsn: str) -> None:
    settings = quiet(idle_timeout=0.2, min_size=1)
    async with TenantPoolManager(
        {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.02
    ) as manager:
        await open_together(manager, "acme", 4)
        assert manager.stats().idle == 4
        await until(lambda: manager.stats().total == 1)
        await anyio.sleep(0.3)  # past idle_timeout again: min_size holds
        assert (manager.stats().total, manager.stats().idle) == (1, 1)


async def test_recycling_is_spread_by_jitter_and_never_takes_a_checked_out_connection(
    pg: PostgresCluster, login_dsn: str
) -> None:
    max_age, jitter, n = 2.0, 0.5, 50
    settings = quiet(max_size=n + 1, max_age=max_age, max_age_jitter=jitter)
    async with TenantPoolManager(
        {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.02
    ) as manager:
        async with manager.with_connection("acme") as held:
            held_pid = held.get_server_pid()
            pids = await open_together(manager, "acme", n)
            # Each connection's own lifetime, drawn when it was opened: what the timing is
            # checked against, so that slow connects on a busy machine cost no slack.
            (pool,) = manager._pools.values()
            expires = {c.raw.get_server_pid(): c.expires_at for c in pool._dispatch.idle}
            assert sorted(expires) == sorted(pids)
            gone_at: dict[int, float] = {}
            with anyio.fail_after(max_age + 60):  # a ceiling, not a timing
                while len(gone_at) < n:
                    living = await alive(pg, pids)
                    now = time.monotonic()  # after the query: gone by then
                    for pid in set(pids) - living - set(gone_at):
                        gone_at[pid] = now
                    await anyio.sleep(0.02)
            # Past its own max_age, but checked out: still ours, still working.
            assert await held.fetchval("SELECT pg_backend_pid()") == held_pid
        # Recycled on its way back instead of going idle.
        await until(lambda: manager.stats().total == 0)
        assert not await alive(pg, [held_pid])
        assert manager.stats().recycles == n + 1
    # Never recycled before its own lifetime is over...
    for pid, seen in gone_at.items():
        due = expires[pid]
        assert due is not None and seen >= due, (pid, seen - due)
    # ...and the lifetimes, drawn from [1.0, 2.0] s, are spread: so are the recycles. (50
    # uniform draws within 0.5 s of each other: p < 1e-12.)
    lifetimes = sorted(due for due in expires.values() if due is not None)
    assert lifetimes[-1] - lifetimes[0] >= 0.5
    first = min(gone_at.values())
    assert sum(due > first for due in lifetimes) > 0  # some were still due when one went


async def test_keepalive_pings_idle_connections_and_dead_ones_are_dropped(
    pg: PostgresCluster, login_dsn: str
) -> None:
    settings = quiet(keepalive_interval=0.1)
    async with TenantPoolManager(
        {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.02
    ) as manager:
        pids = await open_together(manager, "acme", 2)
        async with manager.with_connection("acme") as conn:
            await conn.execute("SELECT 'marker'")
            pid = conn.get_server_pid()
        sql = "SELECT query FROM pg_stat_activity WHERE pid = $1"
        with anyio.fail_after(3):
            while await pg.fetchval(sql, pid) != "SELECT 1":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        other = next(p for p in pids if p != pid)
        await pg.execute("SELECT pg_terminate_backend($1)", other)
        await until(lambda: manager.stats().total == 1)
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() == pid


async def test_min_size_is_refilled_in_the_background(login_dsn: str) -> None:
    settings = quiet(min_size=3)
    async with TenantPoolManager(
        {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.02
    ) as manager:
        async with manager.with_connection("acme"):
            pass
        await until(lambda: manager.stats().idle == 3)
        await anyio.sleep(0.1)
        assert manager.stats().total == 3


async def test_pools_unused_for_a_while_are_forgotten_and_counters_survive(login_dsn: str) -> None:
    n = 200
    targets = {f"t{i}": Target(tenant_dsn(login_dsn, f"t{i}")) for i in range(n)}
    settings = quiet(idle_timeout=0.05)
    async with TenantPoolManager(
        targets, pool=settings, reap_interval=0.02, forget_after=0.1, max_total_connections=10
    ) as manager:
        pools: list[weakref.ref[Pool]] = []
        for tenant in targets:
            async with manager.with_connection(tenant) as conn:
                assert await conn.fetchval("SELECT 1") == 1
                pools += [weakref.ref(p) for p in manager._pools.values()][-1:]
        assert len(manager.stats().pools) > 0
        await until(lambda: not manager.stats().pools)

        # Forgotten means freed: no timer, task or capacity entry keeps a pool alive (beyond
        # the close tasks and callbacks in flight a moment longer).
        def all_freed() -> bool:
            gc.collect()
            return all(ref() is None for ref in pools)

        await until(all_freed, 2)
        stats = manager.stats()
        assert (stats.total, stats.checkouts) == (0, n)
        assert not manager._pool_names
        # A forgotten tenant comes back as if new.
        async with manager.with_connection("t0") as conn:
            assert await conn.fetchval("SELECT current_setting('application_name')") == "t0"
        (name,) = manager.stats().pools
        assert name.endswith("application_name=t0")


async def test_a_failing_duty_is_logged_and_the_others_still_run(
    login_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Pool, now: float) -> None:
        raise RuntimeError("recycle is broken")

    monkeypatch.setattr(Pool, "recycle", broken)
    settings = quiet(idle_timeout=0.1)
    with caplog.at_level(logging.ERROR, logger="tenantpool"):
        async with TenantPoolManager(
            {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.02
        ) as manager:
            await open_together(manager, "acme", 2)
            await until(lambda: manager.stats().total == 0)  # reaping still ran
            assert (await manager.health()).background_task == "running"
    assert any("recycle failed" in r.getMessage() for r in caplog.records)
    assert "recycle is broken" in caplog.text


async def test_a_dead_background_task_makes_health_failing(
    login_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with TenantPoolManager({"acme": Target(login_dsn)}, reap_interval=0.02) as manager:
        assert (await manager.health()).status == "ok"

        def crash(now: float) -> None:
            raise SystemError("boom")

        with caplog.at_level(logging.ERROR, logger="tenantpool"):
            monkeypatch.setattr(manager._maintenance, "tick", crash)
            await until(lambda: manager._maintenance.state == "dead")
            await until(lambda: "background task died" in caplog.text)  # its done callback
        report = await manager.health()
        assert report.status == "failing"
        assert report.background_task == "dead"
        assert any("background task is dead" in reason for reason in report.reasons)
        # Checkouts still work: upkeep is lost, service is not.
        async with manager.with_connection("acme") as conn:
            assert await conn.fetchval("SELECT 1") == 1
        await drained(manager)


async def test_a_reset_the_server_never_answers_is_cut_off(
    login_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog terminates a connection stuck in its reset, so the slot comes back."""
    settings = quiet(connect_timeout=0.3, max_size=1)
    async with TenantPoolManager(
        {"acme": Target(login_dsn)}, pool=settings, reap_interval=0.05
    ) as manager:
        async with manager.with_connection("acme") as conn:
            frozen = conn.get_server_pid()
            await conn.execute("SET work_mem = '8MB'")  # dirty: the release resets it
            os.kill(frozen, signal.SIGSTOP)  # the backend stops answering
        try:
            assert manager.stats().pools[next(iter(manager.stats().pools))].releasing == 1
            with caplog.at_level(logging.WARNING, logger="tenantpool"):
                started = time.monotonic()
                async with manager.with_connection("acme") as conn:
                    assert conn.get_server_pid() != frozen
                waited = time.monotonic() - started
        finally:
            os.kill(frozen, signal.SIGCONT)
        # Cut off after connect_timeout plus a sweep, not at acquire_timeout (10 s).
        assert 0.3 <= waited < 2.0
        assert any("reset or ping took over 0.3 s" in r.getMessage() for r in caplog.records)
        await drained(manager)
