"""The integration outside a single FastAPI app: plain Starlette, routers, mounted apps."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import pytest
from _asgi import serve, shared
from _postgres import PostgresCluster
from _support import drained
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from tenantpool import TenantPoolManager
from tenantpool.fastapi import (
    CurrentTenant,
    RequestConnection,
    TenantMiddleware,
    from_path_prefix,
    health_endpoint,
    install_error_handlers,
    manager_lifespan,
    tenant_scope,
)

pytestmark = pytest.mark.anyio

SETTING = "SELECT current_setting('app.tenant_id')"


async def starlette_who(request: Request) -> JSONResponse:
    async with tenant_scope(request) as conn:
        return JSONResponse({"setting": await conn.fetchval(SETTING)})


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
async def test_plain_starlette_app(pg: PostgresCluster, eager: bool) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = Starlette(
        routes=[Route("/who", starlette_who), Route("/health", health_endpoint)],
        middleware=[Middleware(TenantMiddleware, eager=eager)],
        lifespan=manager_lifespan(manager),
    )
    install_error_handlers(app)
    async with serve(app) as (client, _):
        for tenant in ("acme", "globex"):
            response = await client.get("/who", headers={"X-Tenant-ID": tenant})
            assert response.json() == {"setting": tenant}
        assert (await client.get("/who", headers={"X-Tenant-ID": "nobody"})).status_code == 404
        assert (await client.get("/who", headers={"X-Tenant-ID": "-x"})).status_code == 400
        assert (await client.get("/who")).status_code == 400
        assert (await client.get("/health")).json()["status"] == "ok"
        assert manager.stats().checkouts == 2
        await drained(manager)


async def test_routers_and_mounted_apps_share_the_request_tenant(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))

    router = APIRouter(prefix="/api")

    @router.get("/who")
    async def api_who(conn: RequestConnection, tenant: CurrentTenant) -> dict[str, str]:
        return {"setting": await conn.fetchval(SETTING), "tenant": tenant, "via": "router"}

    # A FastAPI sub-app: no lifespan of its own runs (Starlette does not run a mounted app's),
    # the manager comes from the outer app's lifespan state.
    sub = FastAPI()
    install_error_handlers(sub)  # a mounted app handles its own errors

    @sub.get("/who")
    async def sub_who(conn: RequestConnection) -> dict[str, str]:
        return {"setting": await conn.fetchval(SETTING), "via": "sub"}

    # A sub-app with a middleware of its own: the tenant in its path, below the mount.
    by_path = Starlette(
        routes=[Route("/who", starlette_who)],
        middleware=[Middleware(TenantMiddleware, source=from_path_prefix("/t"))],
    )
    install_error_handlers(by_path)

    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)
    app.include_router(router)
    app.mount("/sub", sub)
    app.router.routes.append(Mount("/paths", app=by_path))

    async with serve(app) as (client, _):
        headers = {"X-Tenant-ID": "acme"}
        response = await client.get("/api/who", headers=headers)
        assert response.json() == {"setting": "acme", "tenant": "acme", "via": "router"}
        response = await client.get("/sub/who", headers=headers)
        assert response.json() == {"setting": "acme", "via": "sub"}
        assert (await client.get("/sub/who")).status_code == 400
        response = await client.get("/sub/who", headers={"X-Tenant-ID": "nobody"})
        assert (response.status_code, response.json()) == (404, {"detail": "unknown tenant"})
        # The inner middleware's tenant wins inside its app, and is undone when it returns.
        response = await client.get("/paths/t/globex/who", headers=headers)
        assert response.json() == {"setting": "globex"}
        assert (await client.get("/paths/t/nobody/who")).status_code == 404
        await drained(manager)
