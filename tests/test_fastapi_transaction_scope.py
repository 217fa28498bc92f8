"""FastAPI with ``state_scope="transaction"``: a response never reports work that did not commit.

The request's connection is one transaction carrying the tenant's state. What the endpoint did is
committed as the response starts (a failed commit becomes the error response instead); what runs
after it (a streaming body, background tasks) is committed when the request ends; an error out of
the application rolls back.
"""

# No "from __future__ import annotations": FastAPI reads the annotations of local endpoints.

from collections.abc import AsyncIterator
from typing import Any

import pytest
from _asgi import serve, shared
from _postgres import PostgresCluster, unique_name
from _support import drained
from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from tenantpool import PoolSettings, TenantConnection, TenantPoolManager
from tenantpool.fastapi import (
    EndpointConnection,
    RequestConnection,
    TenantMiddleware,
    TransactionConnection,
    install_error_handlers,
    manager_lifespan,
)

pytestmark = pytest.mark.anyio

PER_TRANSACTION = PoolSettings(max_size=2, acquire_timeout=10, state_scope="transaction")
ACME = {"X-Tenant-ID": "acme"}


@pytest.fixture
async def table(pg: PostgresCluster) -> AsyncIterator[str]:
    name = unique_name("txnotes")
    await pg.execute(
        f"CREATE TABLE {name} (body text, tenant text DEFAULT current_setting('app.tenant_id'),"
        " once int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )
    yield name
    await pg.execute(f"DROP TABLE {name}")


def make_app(pg: PostgresCluster, **middleware: Any) -> tuple[FastAPI, TenantPoolManager]:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"), pool=PER_TRANSACTION)
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, **middleware)
    install_error_handlers(app)
    return app, manager


async def bodies(pg: PostgresCluster, table: str) -> list[tuple[str, str]]:
    rows = await pg.fetch(f"SELECT body, tenant FROM {table} ORDER BY body")
    return [(r["body"], r["tenant"]) for r in rows]


@pytest.mark.parametrize("eager", [False, True])
async def test_what_the_response_reports_has_committed_when_it_arrives(
    pg: PostgresCluster, table: str, eager: bool
) -> None:
    app, manager = make_app(pg, eager=eager)

    @app.post("/notes/{body}")
    async def add(body: str, conn: RequestConnection) -> dict[str, bool]:
        await conn.execute(f"INSERT INTO {table} (body) VALUES ($1)", body)
        return {"in_transaction": conn.is_in_transaction()}

    async with serve(app) as (client, _):
        response = await client.post("/notes/first", headers=ACME)
        assert response.json() == {"in_transaction": True}
        # Read from outside before the request has even been released.
        assert await bodies(pg, table) == [("first", "acme")]
        await drained(manager)


@pytest.mark.parametrize("dependency", ["request", "endpoint", "transaction"])
async def test_a_commit_that_fails_is_an_error_response_not_a_200(
    pg: PostgresCluster, table: str, dependency: str
) -> None:
    app, manager = make_app(pg)
    twice = f"INSERT INTO {table} (body, once) VALUES ('a', 1), ('b', 1)"  # fails at commit

    @app.post("/request")
    async def with_request(conn: RequestConnection) -> dict[str, str]:
        await conn.execute(twice)
        return {"saved": "yes"}

    @app.post("/endpoint")
    async def with_endpoint(conn: EndpointConnection) -> dict[str, str]:
        await conn.execute(twice)
        return {"saved": "yes"}

    @app.post("/transaction")
    async def with_transaction(conn: TransactionConnection) -> dict[str, str]:
        await conn.execute(twice)
        return {"saved": "yes"}

    async with serve(app) as (client, _):
        with pytest.raises(Exception, match="duplicate key"):
            await client.post(f"/{dependency}", headers=ACME)
        await drained(manager)
        assert manager.stats().in_use == 0
    assert await bodies(pg, table) == []


async def test_an_error_out_of_the_application_rolls_back(pg: PostgresCluster, table: str) -> None:
    app, manager = make_app(pg)

    @app.post("/crash")
    async def crash(conn: RequestConnection) -> None:
        await conn.execute(f"INSERT INTO {table} (body) VALUES ('crash')")
        raise RuntimeError("boom")

    @app.post("/refuse")
    async def refuse(conn: TransactionConnection) -> None:
        await conn.execute(f"INSERT INTO {table} (body) VALUES ('refused')")
        raise HTTPException(409, "refused")

    async with serve(app) as (client, _):
        with pytest.raises(RuntimeError, match="boom"):
            await client.post("/crash", headers=ACME)
        # TransactionConnection is a savepoint here: an HTTPException undoes it.
        assert (await client.post("/refuse", headers=ACME)).status_code == 409
        await drained(manager)
    assert await bodies(pg, table) == []


async def test_work_after_the_response_runs_with_the_tenants_state_and_commits_at_the_end(
    pg: PostgresCluster, table: str
) -> None:
    app, manager = make_app(pg)

    async def audit(conn: TenantConnection) -> None:
        await conn.execute(f"INSERT INTO {table} (body) VALUES ('background')")

    @app.post("/later")
    async def later(conn: RequestConnection, background: BackgroundTasks) -> dict[str, str]:
        await conn.execute(f"INSERT INTO {table} (body) VALUES ('endpoint')")
        background.add_task(audit, conn)
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream(conn: RequestConnection) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            for _ in range(3):
                yield str(await conn.fetchval("SELECT current_setting('app.tenant_id')"))
                yield str(conn.is_in_transaction())

        return StreamingResponse(rows())

    async with serve(app) as (client, _):
        assert (await client.post("/later", headers=ACME)).json() == {"ok": "yes"}
        assert (await client.get("/stream", headers=ACME)).text == "acmeTrue" * 3
        await drained(manager)
    assert await bodies(pg, table) == [("background", "acme"), ("endpoint", "acme")]
