"""init and connect share one deadline; init's own failures are errors, not outages."""

from __future__ import annotations

import asyncio
import logging

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster
from _support import drained

from tenantpool import (
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolError,
    TenantPoolManager,
    TenantUnavailable,
)

pytestmark = pytest.mark.anyio


async def test_a_stalled_init_gives_its_slot_back_at_connect_timeout(pg: PostgresCluster) -> None:
    stall = True

    async def init(conn: asyncpg.Connection) -> None:
        if stall:
            await anyio.sleep_forever()

    settings = PoolSettings(max_size=1, connect_timeout=0.3, acquire_timeout=30)
    async with TenantPoolManager({"a": Target(pg.dsn())}, pool=settings, init=init) as manager:
        with anyio.fail_after(20):
            with pytest.raises(TenantPoolError, match="init did not finish") as info:
                async with manager.with_connection("a"):
                    pass
        assert not isinstance(info.value, (TenantUnavailable, PoolTimeout))
        assert manager.stats().total == 0 and manager.stats().backing_off == 0
        stall = False
        async with manager.with_connection("a") as conn:  # the slot is free, no backoff
            assert await conn.fetchval("SELECT 1") == 1
        await drained(manager)


async def test_an_exception_in_init_is_reported_as_such_without_backoff(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    broken = True

    async def init(conn: asyncpg.Connection) -> None:
        if broken:
            raise TypeError("init's own bug")

    async with TenantPoolManager(
        {"a": Target(pg.dsn())}, init=init, reconnect_delay=10, reconnect_jitter=False
    ) as manager:
        with caplog.at_level(logging.ERROR, "tenantpool"):
            for _ in range(3):  # each attempt reports it; none is turned away by a backoff
                with pytest.raises(TenantPoolError, match="init callback failed") as info:
                    async with manager.with_connection("a"):
                        pass
                assert not isinstance(info.value, TenantUnavailable)
                assert "TypeError: init's own bug" in str(info.value)
        assert "init's own bug" in caplog.text
        stats = manager.stats()
        assert stats.backing_off == 0 and stats.connect_errors == 0 and stats.total == 0
        assert (await manager.health()).status == "ok"
        broken = False
        async with manager.with_connection("a") as conn:
            assert await conn.fetchval("SELECT 1") == 1


async def test_the_watchdog_cancels_an_open_that_outlives_its_deadline(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    stubborn = True

    async def init(conn: asyncpg.Connection) -> None:
        nonlocal stubborn
        if stubborn:
            stubborn = False
            try:
                await anyio.sleep_forever()
            except asyncio.CancelledError:
                pass  # swallows the deadline's cancellation, and waits on
            await anyio.sleep_forever()

    settings = PoolSettings(max_size=1, connect_timeout=0.2, acquire_timeout=30)
    async with TenantPoolManager(
        {"a": Target(pg.dsn())}, pool=settings, init=init, reap_interval=0.1
    ) as manager:
        with caplog.at_level(logging.WARNING, "tenantpool"), anyio.fail_after(20):
            async with manager.with_connection("a") as conn:
                assert await conn.fetchval("SELECT 1") == 1
        assert "cancelling an open" in caplog.text
        await drained(manager)
        assert manager.stats().total == 1
