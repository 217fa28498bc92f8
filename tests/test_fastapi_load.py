"""Under load and when requests die: every response right, nothing left checked out."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from _asgi import http_scope, serve, stalled_receive
from _postgres import PostgresCluster, unique_name
from _support import drained
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.types import Message

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool.fastapi import (
    CurrentTenant,
    EndpointConnection,
    RequestConnection,
    TenantMiddleware,
    install_error_handlers,
    manager_lifespan,
)

pytestmark = pytest.mark.anyio


async def test_200_concurrent_requests_over_50_tenants_under_a_cap(pg: PostgresCluster) -> None:
    roles = [unique_name("web") for _ in range(5)]
    for role in roles:
        await pg.create_role(role, password=f"pw-{role}")
    # Five logins, so five pools competing for a cap below what they would open together.
    targets = {
        f"t{i:02}": Target(
            pg.dsn(user=roles[i % 5], password=f"pw-{roles[i % 5]}"),
            settings={"app.tenant_id": f"t{i:02}"},
        )
        for i in range(50)
    }
    cap = 6
    manager = TenantPoolManager(
        targets,
        max_total_connections=cap,
        pool=PoolSettings(max_size=4, acquire_timeout=60),
    )
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)

    @app.get("/who")
    async def who(conn: RequestConnection, tenant: CurrentTenant) -> dict[str, Any]:
        row = await conn.fetchrow(
            "SELECT current_setting('app.tenant_id') AS setting, current_user AS login,"
            " pg_sleep(0.002)::text AS slept"
        )
        assert row is not None
        return {"tenant": tenant, "setting": row["setting"], "login": row["login"]}

    results: dict[int, httpx.Response] = {}
    peak = 0

    async with serve(app) as (client, _):

        async def call(n: int) -> None:
            results[n] = await client.get("/who", headers={"X-Tenant-ID": f"t{n % 50:02}"})

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, manager.stats().total)
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as watching:
            watching.start_soon(watch)
            async with anyio.create_task_group() as tg:
                for n in range(200):
                    tg.start_soon(call, n)
            watching.cancel_scope.cancel()

        await drained(manager)
        stats = manager.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)
        assert stats.total <= cap
        assert len(stats.pools) == 5
        assert stats.checkouts == 200

    assert peak == cap  # the cap was reached, and never passed
    for role in roles:
        await pg.drop_role(role)
    for n, response in results.items():
        tenant = f"t{n % 50:02}"
        assert response.status_code == 200, response.text
        assert response.json() == {"tenant": tenant, "setting": tenant, "login": roles[n % 5]}
    assert len(results) == 200


async def active_queries(pg: PostgresCluster, marker: str) -> list[int]:
    rows = await pg.fetch(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1"
        " AND pid <> pg_backend_pid()",
        f"%{marker}%",
    )
    return [row["pid"] for row in rows]


async def wait_for_query(pg: PostgresCluster, marker: str) -> int:
    # The server's view is only to be had by asking it again.
    with anyio.fail_after(10):
        while not (pids := await active_queries(pg, marker)):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    assert len(pids) == 1
    return pids[0]


async def wait_until_gone(pg: PostgresCluster, marker: str) -> None:
    # The cancel request reaches the server on a connection of its own, asynchronously.
    with anyio.fail_after(10):
        while await active_queries(pg, marker):  # noqa: ASYNC110
            await anyio.sleep(0.01)


def sleeping_app(manager: TenantPoolManager, marker: str, eager: bool = False) -> FastAPI:
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, eager=eager)
    sleep = f"SELECT pg_sleep(60) /* {marker} */"

    @app.get("/stream")
    async def stream(conn: RequestConnection) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            yield "started\n"
            await conn.execute(sleep)
            yield "never\n"

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/request")
    async def request_scoped(conn: RequestConnection) -> None:
        await conn.execute(sleep)

    @app.get("/endpoint")
    async def endpoint_scoped(conn: EndpointConnection) -> None:
        await conn.execute(sleep)

    @app.get("/current")
    async def current() -> None:
        await manager.current_connection().execute(sleep)

    return app


async def test_client_disconnecting_mid_stream_cancels_the_query(pg: PostgresCluster) -> None:
    marker = unique_name("stream")
    manager = TenantPoolManager({"acme": Target(pg.dsn())})
    app = sleeping_app(manager, marker)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with serve(app) as (_, lifespan):
        gone = anyio.Event()
        scope = http_scope("/stream", [("X-Tenant-ID", "acme")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan.app, scope, stalled_receive(gone), send)
            await wait_for_query(pg, marker)
            assert manager.stats().in_use == 1
            gone.set()  # the client goes away while the body waits on the query
        assert [m.get("body") for m in sent[1:]] == [b"started\n"]
        await drained(manager)
        assert manager.stats().in_use == 0
        await wait_until_gone(pg, marker)


@pytest.mark.parametrize(
    ("path", "eager"),
    [("/request", False), ("/endpoint", False), ("/current", True), ("/stream", False)],
)
async def test_request_cancelled_mid_query_leaves_nothing_checked_out(
    pg: PostgresCluster, path: str, eager: bool
) -> None:
    marker = unique_name("cancel")
    manager = TenantPoolManager({"acme": Target(pg.dsn())})
    app = sleeping_app(manager, marker, eager=eager)

    async def send(message: Message) -> None:
        pass

    async with serve(app) as (_, lifespan):
        scope = http_scope(path, [("X-Tenant-ID", "acme")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan.app, scope, stalled_receive(), send)
            await wait_for_query(pg, marker)
            tg.cancel_scope.cancel()  # as a server does with a request's task on shutdown
        await drained(manager)
        assert manager.stats().in_use == 0
        await wait_until_gone(pg, marker)
        # The pool still serves: whatever came back was clean, or was closed.
        async with manager.with_connection("acme") as conn:
            assert await conn.fetchval("SELECT 1") == 1
