"""Helpers shared by the tests that drive a manager against the real cluster."""

from __future__ import annotations

import anyio

from tenantpool import TenantPoolManager


async def drained(manager: TenantPoolManager, limit: float = 5.0) -> None:
    """Wait until nothing is checked out, being opened or being reset; fail after ``limit`` s.

    A connection that leaked would stay checked out, and fail this on the time limit.
    """
    # Resets run in tasks the pool owns and signal nothing public; polling stats is the
    # observable a user has too.
    with anyio.fail_after(limit):
        while any(p.in_use or p.releasing or p.opening for p in manager.stats().pools.values()):  # noqa: ASYNC110
            await anyio.sleep(0.005)
