"""The two apps of ``benchmarks/http.py``: one ``GET /notes`` endpoint, written two ways.

Run as uvicorn factories (``benchmarks._http_apps:handrolled --factory``), configured through
the environment: ``BENCH_HTTP_DSN`` (a non-superuser login, so row-level security applies),
``BENCH_HTTP_TABLE``, ``BENCH_HTTP_TENANTS`` (comma-separated) and ``BENCH_HTTP_POOL``.
Both answer the same JSON: the tenant's rows, and ``{"detail": ...}`` with 400 for a missing
or malformed ``X-Tenant-ID``, 404 for an unknown tenant.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool.fastapi import (
    EndpointConnection,
    RequestConnection,
    TenantMiddleware,
    install_error_handlers,
    manager_lifespan,
)

# tenantpool's rule for tenant ids, so that both apps refuse the same requests.
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def _config() -> tuple[str, str, frozenset[str], int]:
    env = os.environ
    query = f'SELECT id, tenant, body FROM "{env["BENCH_HTTP_TABLE"]}" ORDER BY id'
    tenants = frozenset(env["BENCH_HTTP_TENANTS"].split(","))
    return env["BENCH_HTTP_DSN"], query, tenants, int(env["BENCH_HTTP_POOL"])


def _handrolled_base() -> tuple[FastAPI, str, frozenset[str]]:
    dsn, query, tenants, size = _config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with asyncpg.create_pool(dsn, min_size=size, max_size=size) as pool:
            yield {"pool": pool}

    return FastAPI(lifespan=lifespan), query, tenants


def _request_tenant(request: Request, tenants: frozenset[str]) -> str:
    tenant = request.headers.get("x-tenant-id")
    if tenant is None or not TENANT_ID.fullmatch(tenant):
        raise HTTPException(400, "invalid or missing X-Tenant-ID")
    if tenant not in tenants:
        raise HTTPException(404, "unknown tenant")
    return tenant


def handrolled() -> FastAPI:
    """What one writes without tenantpool: a shared asyncpg.Pool, set_config on each request."""
    app, query, tenants = _handrolled_base()

    @app.get("/notes")
    async def notes(request: Request) -> list[dict[str, Any]]:
        tenant = _request_tenant(request, tenants)
        async with request.state.pool.acquire() as conn:
            # Forgetting this line, or a path that skips it, serves the previous tenant's rows.
            await conn.execute("SELECT set_config('app.tenant_id', $1, false)", tenant)
            rows = await conn.fetch(query)
        return [dict(row) for row in rows]

    return app


def handrolled_dependency() -> FastAPI:
    """The same, the way FastAPI's documentation shapes it: the connection from a dependency."""
    app, query, tenants = _handrolled_base()

    async def connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
        tenant = _request_tenant(request, tenants)
        async with request.state.pool.acquire() as conn:
            await conn.execute("SELECT set_config('app.tenant_id', $1, false)", tenant)
            yield conn

    @app.get("/notes")
    async def notes(
        conn: Annotated[asyncpg.Connection, Depends(connection, scope="function")],
    ) -> list[dict[str, Any]]:
        return [dict(row) for row in await conn.fetch(query)]

    return app


def _tenantpool_base() -> tuple[FastAPI, str]:
    dsn, query, tenants, size = _config()
    targets = {t: Target(dsn, settings={"app.tenant_id": t}) for t in tenants}
    manager = TenantPoolManager(targets, pool=PoolSettings(min_size=size, max_size=size))
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)
    return app, query


def tenantpool_app() -> FastAPI:
    """The same with tenantpool: the middleware names the tenant, the dependency connects."""
    app, query = _tenantpool_base()

    @app.get("/notes")
    async def notes(conn: RequestConnection) -> list[dict[str, Any]]:
        return [dict(row) for row in await conn.fetch(query)]

    return app


def tenantpool_endpoint_app() -> FastAPI:
    """The same, the connection given back as the endpoint returns, as ``pool.acquire()``."""
    app, query = _tenantpool_base()

    @app.get("/notes")
    async def notes(conn: EndpointConnection) -> list[dict[str, Any]]:
        return [dict(row) for row in await conn.fetch(query)]

    return app
