"""Helpers shared by the tests that drive a manager against the real cluster."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Sequence

import anyio
import asyncpg
from _postgres import PostgresCluster

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


def tenant_dsn(dsn: str, name: str) -> str:
    """``dsn`` made distinct by its ``application_name``: a pool of its own, same server."""
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


class ServerSampler:
    """Counts, from a thread of its own, the client backends the server holds for one role.

    The thread runs its own event loop and superuser connection, so the figures do not depend
    on how busy the loop under test is. Backends still authenticating have no user yet and
    are counted too.
    """

    def __init__(self, superuser_dsn: str, role: str) -> None:
        self._dsn = superuser_dsn
        self._role = role
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._error: BaseException | None = None
        self.samples: list[int] = []

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._sample())
        except BaseException as exc:  # reported by __exit__ on the test's thread
            self._error = exc
            self._ready.set()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            query = await conn.prepare(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid() AND (usename = $1 OR usename IS NULL)"
            )
            self._ready.set()
            while not self._stop.is_set():
                self.samples.append(await query.fetchval(self._role))
                await asyncio.sleep(0.002)
        finally:
            await conn.close()


async def until(condition: Callable[[], object], limit: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)


class FakeServer:
    """A TCP port that counts connection attempts and drops them, or leaves them hanging."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.attempts = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def dsn(self, password: str = "") -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        auth = f"x:{password}" if password else "x"
        return f"postgresql://{auth}@127.0.0.1:{port}/app"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        if self.hang:
            self._writers.append(writer)
        else:
            writer.close()


async def open_together(manager: TenantPoolManager, tenant: str, n: int) -> list[int]:
    """Check out ``n`` connections of ``tenant`` at once and give them back; their pids."""
    pids: list[int] = []
    ready = anyio.Event()

    async def hold() -> None:
        async with manager.with_connection(tenant) as conn:
            pids.append(conn.get_server_pid())
            if len(pids) == n:
                ready.set()
            await ready.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(hold)
    return pids


async def server_connections(pg: PostgresCluster, user: str) -> int:
    """Backends the server holds for ``user``, the asking connection left out."""
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
            user,
        )
    )


async def cancellation_storm(
    manager: TenantPoolManager,
    tenants: Sequence[str],
    check: Callable[[asyncpg.Connection, str], Awaitable[None]],
    *,
    seed: int,
    workers: int = 300,
) -> None:
    """``workers`` checkouts, each taking an advisory lock in a transaction and checking its
    tenant's state with ``check``, each cancelled at a random point within 10 ms."""
    rng = random.Random(seed)

    async def worker(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        async with manager.with_connection(tenant) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", i % 5)
                await check(conn, tenant)
            await conn.fetchval("SELECT pg_sleep(0.001)")

    async def cancel_soon(i: int) -> None:
        with anyio.move_on_after(rng.uniform(0, 0.01)):
            await worker(i)

    async with anyio.create_task_group() as tg:
        for i in range(workers):
            tg.start_soon(cancel_soon, i)
