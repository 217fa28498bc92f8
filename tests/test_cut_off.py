"""A connection cut off (terminated) keeps its slot a while: the server never sees more than the
cap, even while the backend of a terminated connection lives on (issue 10, item 6)."""

from __future__ import annotations

import logging
import os
import signal

import anyio
import pytest
from _postgres import PostgresCluster, unique_name
from _support import ServerSampler, drained, until

from tenantpool import PoolSettings, Target, TenantPoolManager

pytestmark = pytest.mark.anyio


async def test_a_terminated_connection_holds_its_slot_until_its_backend_is_gone(
    pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    role = unique_name("login")
    await pg.create_role(role, password="pw-" + role)
    settings = PoolSettings(
        connect_timeout=2.0, idle_timeout=None, max_age=None, keepalive_interval=None
    )
    manager = TenantPoolManager(
        {"a": Target(pg.dsn(role, "pw-" + role))},
        max_total_connections=1,
        pool=settings,
        reap_interval=0.05,
    )
    with ServerSampler(pg.superuser_dsn, role) as sampler, caplog.at_level(logging.WARNING):
        async with manager:
            async with manager.with_connection("a") as conn:
                frozen = conn.get_server_pid()
                await conn.execute("SET work_mem = '8MB'")  # dirty: the release resets it
                os.kill(frozen, signal.SIGSTOP)  # the backend stops answering mid-reset
            thawed = False
            try:
                served = anyio.Event()
                pids: list[int] = []

                async def next_checkout() -> None:
                    async with manager.with_connection("a") as conn:
                        pids.append(conn.get_server_pid())
                        served.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(next_checkout)
                    # The watchdog terminates it; its slot stays taken, counted as closing.
                    (name,) = manager.stats().pools
                    await until(
                        lambda: (
                            manager.stats().pools[name].closing == 1
                            and manager.stats().pools[name].releasing == 0
                        ),
                        limit=30,
                    )
                    assert not served.is_set() and manager.stats().total == 1
                    os.kill(frozen, signal.SIGCONT)  # it wakes, finds its socket gone, exits
                    thawed = True
                    with anyio.fail_after(30):
                        await served.wait()
            finally:
                if not thawed:
                    os.kill(frozen, signal.SIGCONT)
            assert pids and pids[0] != frozen
            await drained(manager)
    assert "reset or ping took over" in caplog.text
    assert len(sampler.samples) >= 10
    assert sampler.peak <= 1
