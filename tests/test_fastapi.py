"""The FastAPI integration: middleware, dependencies, lifespan, against the real cluster."""

# No "from __future__ import annotations": FastAPI reads the annotations of endpoints defined
# inside the tests, which name local dependencies.

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from _asgi import http_scope, serve, shared, stalled_receive
from _postgres import PostgresCluster, unique_name
from _support import drained
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from tenantpool import ConnectionReleased, ManagerClosed, TenantConnection, TenantPoolManager
from tenantpool.fastapi import (
    CurrentTenant,
    EndpointConnection,
    PoolManager,
    RequestConnection,
    TenantMiddleware,
    TransactionConnection,
    install_error_handlers,
    manager_lifespan,
    tenant_connection,
    tenant_scope,
)

pytestmark = pytest.mark.anyio

TENANT_SETTING = "SELECT current_setting('app.tenant_id')"


def make_app(manager: TenantPoolManager, **middleware: Any) -> FastAPI:
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, **middleware)
    install_error_handlers(app)
    return app


def acme(tenant: str = "acme") -> dict[str, str]:
    return {"X-Tenant-ID": tenant}


async def test_request_connection_is_the_header_tenants_and_one_per_request(
    pg: PostgresCluster,
) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = make_app(manager)

    async def pid_of(conn: RequestConnection) -> int:
        return conn.get_server_pid()

    @app.get("/who")
    async def who(
        conn: RequestConnection, tenant: CurrentTenant, pid: Annotated[int, Depends(pid_of)]
    ) -> dict[str, Any]:
        assert manager.current_connection() is conn
        return {
            "tenant": tenant,
            "setting": await conn.fetchval(TENANT_SETTING),
            "same": pid == conn.get_server_pid(),
        }

    async with serve(app) as (client, _):
        for tenant in ("acme", "globex", "acme"):
            before = manager.stats().checkouts
            response = await client.get("/who", headers=acme(tenant))
            assert response.status_code == 200
            assert response.json() == {"tenant": tenant, "setting": tenant, "same": True}
            # The sub-dependency and the endpoint got the same, single checkout.
            assert manager.stats().checkouts == before + 1
        await drained(manager)


async def test_routes_that_do_not_use_the_database_check_out_nothing(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)

    @app.get("/plain")
    async def plain(request: Request, pool: PoolManager) -> dict[str, bool]:
        return {"state": request.state.tenantpool_manager is pool is manager}

    async with serve(app) as (client, _):
        for headers in (acme(), {}, acme("nobody")):
            response = await client.get("/plain", headers=headers)
            assert response.json() == {"state": True}
        assert manager.stats().checkouts == 0
        # A malformed id is refused even where no connection would be taken.
        response = await client.get("/plain", headers=acme("no such!"))
        assert response.status_code == 400


async def test_transaction_commits_on_success_and_rolls_back_on_error(
    pg: PostgresCluster,
) -> None:
    table = unique_name("notes")
    await pg.execute(f"CREATE TABLE {table} (body text)")
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)

    @app.post("/notes/{body}")
    async def add(body: str, conn: TransactionConnection) -> dict[str, bool]:
        await conn.execute(f"INSERT INTO {table} VALUES ($1)", body)
        if body == "bad":
            raise HTTPException(422, "refused")
        return {"in_transaction": conn.is_in_transaction()}

    @app.post("/crash")
    async def crash(conn: TransactionConnection) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES ('crash')")
        raise RuntimeError("boom")

    async with serve(app) as (client, _):
        response = await client.post("/notes/good", headers=acme())
        assert response.json() == {"in_transaction": True}
        response = await client.post("/notes/bad", headers=acme())
        assert response.status_code == 422
        with pytest.raises(RuntimeError, match="boom"):
            await client.post("/crash", headers=acme())
        await drained(manager)
    assert [r["body"] for r in await pg.fetch(f"SELECT body FROM {table}")] == ["good"]
    await pg.execute(f"DROP TABLE {table}")


async def test_a_failed_commit_is_reported_to_the_client(pg: PostgresCluster) -> None:
    table = unique_name("deferred")
    await pg.execute(f"CREATE TABLE {table} (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)

    @app.post("/twice")
    async def twice(conn: TransactionConnection) -> dict[str, str]:
        await conn.execute(f"INSERT INTO {table} VALUES (1), (1)")  # fails only at commit
        return {"saved": "yes"}

    async with serve(app) as (client, _):
        # The commit runs before the response: its failure is not a 200 that lied.
        with pytest.raises(Exception, match="duplicate key"):
            await client.post("/twice", headers=acme())
        await drained(manager)
    assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0
    await pg.execute(f"DROP TABLE {table}")


async def test_background_tasks_share_the_request_connection(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)
    seen: list[object] = []

    async def audit(conn: TenantConnection) -> None:
        seen.append(await conn.fetchval(TENANT_SETTING))
        seen.append(manager.current_tenant())
        async with tenant_scope() as again:  # the request's scope, reused: no second checkout
            seen.append(again is conn)

    @app.get("/later")
    async def later(conn: RequestConnection, background: BackgroundTasks) -> dict[str, str]:
        background.add_task(audit, conn)
        return {"ok": "yes"}

    async with serve(app) as (client, _):
        response = await client.get("/later", headers=acme())
        assert response.json() == {"ok": "yes"}
        assert seen == ["acme", "acme", True]
        assert manager.stats().checkouts == 1
        await drained(manager)


async def test_endpoint_connection_is_released_when_the_endpoint_returns(
    pg: PostgresCluster,
) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)
    seen: list[object] = []

    async def after(conn: TenantConnection) -> None:
        seen.append(manager.stats().in_use)
        try:
            await conn.fetchval("SELECT 1")
        except ConnectionReleased as exc:
            seen.append(type(exc))

    @app.get("/endpoint")
    async def endpoint(conn: EndpointConnection, background: BackgroundTasks) -> int:
        background.add_task(after, conn)
        return int(await conn.fetchval("SELECT 1"))

    @app.get("/request")
    async def request(conn: RequestConnection, background: BackgroundTasks) -> int:
        background.add_task(after, conn)
        return int(await conn.fetchval("SELECT 1"))

    async with serve(app) as (client, _):
        assert (await client.get("/endpoint", headers=acme())).json() == 1
        # Released before the response went out: the background task cannot use it.
        assert seen == [0, ConnectionReleased]
        seen.clear()
        assert (await client.get("/request", headers=acme())).json() == 1
        assert seen == [1]
        await drained(manager)


async def test_streaming_body_uses_the_request_connection(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = make_app(manager)

    @app.get("/stream")
    async def stream(conn: RequestConnection) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            for i in range(5):
                yield f"{i}:{await conn.fetchval(TENANT_SETTING)}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    async with serve(app) as (client, _):
        for tenant in ("acme", "globex"):
            response = await client.get("/stream", headers=acme(tenant))
            assert response.text == "".join(f"{i}:{tenant}\n" for i in range(5))
        await drained(manager)


async def test_eager_mode_opens_the_scope_before_the_endpoint(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager, eager=True)
    called: list[str] = []

    @app.get("/deep")
    async def deep(conn: RequestConnection) -> dict[str, Any]:
        called.append("deep")
        current = manager.current_connection()  # code far from the endpoint finds it too
        return {"same": current is conn, "setting": await current.fetchval(TENANT_SETTING)}

    async with serve(app) as (client, _):
        response = await client.get("/deep", headers=acme())
        assert response.json() == {"same": True, "setting": "acme"}
        assert manager.stats().checkouts == 1
        # The middleware answers an unknown tenant itself; the endpoint never runs.
        response = await client.get("/deep", headers=acme("nobody"))
        assert (response.status_code, response.json()) == (404, {"detail": "unknown tenant"})
        assert called == ["deep"]
        await drained(manager)


async def test_lifespan_composes_with_the_apps_own_and_can_run_twice(pg: PostgresCluster) -> None:
    managers: list[TenantPoolManager] = []
    events: list[str] = []

    def factory() -> TenantPoolManager:
        managers.append(TenantPoolManager(shared(pg.dsn(), "acme")))
        return managers[-1]

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        async with managers[-1].with_connection("acme") as conn:  # already started
            events.append(f"startup {await conn.fetchval(TENANT_SETTING)}")
        yield {"greeting": "hello"}
        events.append("shutdown")

    app = FastAPI(lifespan=manager_lifespan(factory, own))
    app.add_middleware(TenantMiddleware)

    @app.get("/state")
    async def state(request: Request, conn: RequestConnection) -> dict[str, Any]:
        return {
            "greeting": request.state.greeting,
            "manager": request.state.tenantpool_manager is managers[-1],
        }

    for _ in range(2):
        async with serve(app) as (client, lifespan):
            response = await client.get("/state", headers=acme())
            assert response.json() == {"greeting": "hello", "manager": True}
            assert lifespan.app is not None
        # Closed after the app's own shutdown code.
        with pytest.raises(ManagerClosed):
            async with managers[-1].with_connection("acme"):
                pass
    assert len(managers) == 2
    assert events == ["startup acme", "shutdown"] * 2


async def test_explicit_manager_without_lifespan_state(pg: PostgresCluster) -> None:
    async with TenantPoolManager(shared(pg.dsn(), "acme")) as manager:
        app = FastAPI()
        app.add_middleware(TenantMiddleware, manager=manager)

        @app.get("/who")
        async def who(conn: RequestConnection, pool: PoolManager) -> dict[str, Any]:
            return {"setting": await conn.fetchval(TENANT_SETTING), "mine": pool is manager}

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/who", headers=acme())
        assert response.json() == {"setting": "acme", "mine": True}
        await drained(manager)


async def test_misconfiguration_is_a_clear_server_error(pg: PostgresCluster) -> None:
    async def who(conn: RequestConnection) -> None:
        raise AssertionError("unreachable")

    bare, without_manager = FastAPI(), FastAPI()
    without_manager.add_middleware(TenantMiddleware)
    for app, message in (
        (bare, "add tenantpool.fastapi.TenantMiddleware"),
        (without_manager, "manager_lifespan"),
    ):
        app.get("/who")(who)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with pytest.raises(RuntimeError, match=message):
                await client.get("/who", headers=acme())


async def test_the_request_tenant_is_not_visible_after_the_request(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)

    @app.get("/who")
    async def who(tenant: CurrentTenant) -> str:
        return tenant

    async with serve(app) as (_, lifespan):
        # Driven in this very task, so a ContextVar left set would show here afterwards.
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await lifespan.app(http_scope("/who", [("X-Tenant-ID", "acme")]), stalled_receive(), send)
        assert sent[-1]["body"] == b'"acme"'
        with pytest.raises(RuntimeError, match="no request tenant"):
            async with tenant_scope():
                pass


async def test_dependency_functions_work_in_dependencies_lists(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = make_app(manager)

    @app.get("/deps", dependencies=[Depends(tenant_connection)])
    async def deps() -> str | None:
        # Opened by the dependency, current for the request's task.
        return await manager.current_connection().fetchval(TENANT_SETTING)  # type: ignore[no-any-return]

    async with serve(app) as (client, _):
        assert (await client.get("/deps", headers=acme())).json() == "acme"
        await drained(manager)
