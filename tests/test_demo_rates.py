"""The dashboard's last minute: checkouts per second and the gauges, sampled by the server."""

from __future__ import annotations

import pytest
from _asgi import shared
from _postgres import PostgresCluster

from demo_api._rates import Rates
from tenantpool import TenantPoolManager

pytestmark = pytest.mark.anyio


async def test_samples_give_checkouts_per_second_and_keep_the_last_minute(
    pg: PostgresCluster,
) -> None:
    rates = Rates(keep=3)
    async with TenantPoolManager(shared(pg.dsn(), "acme")) as manager:
        rates.sample(manager, now=100.0)
        assert rates.history() == []  # a rate needs two samples
        for _ in range(3):
            async with manager.with_connection("acme") as conn:
                await conn.fetchval("SELECT 1")
        async with manager.with_connection("acme"):
            rates.sample(manager, now=102.0)
            total = manager.stats().total  # one, or more: resets run in the background
        [first] = rates.history()
        assert first.checkouts_per_s == 2.0  # 4 checkouts in 2 s
        assert (first.in_use, first.waiting, first.total) == (1, 0, total)
        for second in range(103, 108):
            rates.sample(manager, now=float(second))
        assert len(rates.history()) == 3  # only the last `keep`
        assert [s.checkouts_per_s for s in rates.history()] == [0.0, 0.0, 0.0]
