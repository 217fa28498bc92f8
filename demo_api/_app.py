"""The FastAPI application: its lifespan, the routes, and the error responses."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tenantpool import PoolStats, TenantPoolManager, UnknownTenant, redact_dsn, validate_tenant_id
from tenantpool.fastapi import (
    CurrentTenant,
    EndpointConnection,
    PoolManager,
    TenantMiddleware,
    from_header,
    health_endpoint,
    install_error_handlers,
    manager_lifespan,
    tenant_scope,
)
from tenantpool.fastapi.metrics import metrics_endpoint

from ._dashboard import DASHBOARD_HTML
from ._limits import BodySizeLimit
from ._models import (
    DashboardStats,
    Note,
    NoteCreate,
    PoolFigures,
    TargetInfo,
    TenantCreate,
    TenantCreated,
    TenantDetail,
    TenantSummary,
)
from ._rates import Rates
from ._registry import ISOLATIONS, TENANT_POOL, Checkpoint, Registry, TenantExists

__all__ = ["create_app"]

logger = logging.getLogger("demo_api")

REGISTRY_KEY = "demo_registry"
RATES_KEY = "demo_rates"

# What a 400 on POST /tenants says, by field.
_FIELD_ERRORS = {
    "id": (
        "invalid tenant id: expected 1-63 letters, digits, '_' or '-', starting with a letter"
        " or digit"
    ),
    "isolation": f"invalid isolation: expected one of {', '.join(ISOLATIONS)}",
}


def create_app(
    admin_dsn: str,
    *,
    prefix: str = "demo",
    max_connections: int = 20,
    checkpoint: Checkpoint | None = None,
) -> FastAPI:
    """The demo's application over the server at ``admin_dsn`` (its superuser or admin role).

    The registry's tables and roles are created at startup; the manager's pools are capped at
    ``max_connections`` connections in all.
    """

    registry = Registry(admin_dsn, prefix=prefix, checkpoint=checkpoint)
    current: list[TenantPoolManager] = []  # this startup's manager, for the rates' sampler

    def new_manager() -> TenantPoolManager:
        # A new one at each startup: a closed manager cannot be started again.
        manager = TenantPoolManager(
            registry.resolve, max_total_connections=max_connections, pool=TENANT_POOL
        )
        current[:] = [manager]
        return manager

    @asynccontextmanager
    async def open_registry(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Runs inside manager_lifespan: the manager starts first and closes last.
        await registry.open()
        rates = Rates()
        try:
            logger.info(
                "tenant registry in %s; at most %d connections",
                redact_dsn(admin_dsn),
                max_connections,
            )
            async with anyio.create_task_group() as sampler:
                sampler.start_soon(rates.run, current[0])
                try:
                    yield {REGISTRY_KEY: registry, RATES_KEY: rates}
                finally:
                    sampler.cancel_scope.cancel()
        finally:
            await registry.close()

    app = FastAPI(
        title="tenantpool demo",
        summary="Notes for many tenants, four ways to keep them apart, one connection cap.",
        lifespan=manager_lifespan(new_manager, open_registry),
    )
    # The tenant of each request is its X-Tenant-ID header; no connection is taken until an
    # endpoint asks for one.
    app.add_middleware(TenantMiddleware, source=from_header("X-Tenant-ID"))
    # Outermost of the two (added last): a body too large is refused before anything else.
    app.add_middleware(BodySizeLimit)
    install_error_handlers(app)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(TenantExists, _conflict)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    return app


def _registry(request: Request) -> Registry:
    registry = getattr(request.state, REGISTRY_KEY, None)
    if not isinstance(registry, Registry):
        raise RuntimeError("no registry in the lifespan state")
    return registry


RegistryDep = Annotated[Registry, Depends(_registry)]


router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(DASHBOARD_HTML, headers={"Cache-Control": "no-store"})


@router.get("/api/stats")
async def stats(manager: PoolManager, request: Request) -> DashboardStats:
    """The dashboard's figures: the cap, connections overall and per pool, health, and the
    last minute's checkouts per second, waiting and in-use counts (one sample a second)."""
    rates: Rates = getattr(request.state, RATES_KEY)
    report = await manager.health()
    figures = manager.stats()
    return DashboardStats(
        status=report.status,
        reasons=list(report.reasons),
        cap=figures.max_total,
        total=figures.total,
        in_use=figures.in_use,
        idle=figures.idle,
        waiting=figures.waiting,
        checkouts=figures.checkouts,
        timeouts=figures.timeouts,
        steals=figures.steals,
        pools=[_pool_figures(name, pool) for name, pool in sorted(figures.pools.items())],
        history=rates.history(),
    )


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, registry: RegistryDep) -> TenantCreated:
    """Register a tenant and create its database objects (409 if the id is taken)."""
    tenant = await registry.create(body.id, body.isolation)
    return TenantCreated(id=tenant.id, isolation=tenant.isolation, created_at=tenant.created_at)


@router.get("/tenants")
async def list_tenants(registry: RegistryDep) -> list[TenantSummary]:
    """Every tenant, oldest first (at most 1,000): its isolation model and its pool's name."""
    return [
        TenantSummary(
            id=tenant.id,
            isolation=tenant.isolation,
            created_at=tenant.created_at,
            pool=redact_dsn(tenant.target.dsn),
        )
        for tenant in await registry.list_tenants()
    ]


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, registry: RegistryDep, manager: PoolManager) -> TenantDetail:
    """A tenant's isolation model, where its connections go, and its pool's figures."""
    tenant = await registry.get(validate_tenant_id(tenant_id))
    if tenant is None:
        raise UnknownTenant(f"unknown tenant {tenant_id!r}")
    target = tenant.target
    pool_name = redact_dsn(target.dsn)
    pool = manager.stats().pools.get(pool_name)
    return TenantDetail(
        id=tenant.id,
        isolation=tenant.isolation,
        created_at=tenant.created_at,
        target=TargetInfo(pool=pool_name, schema=target.schema, settings=dict(target.settings)),
        pool=None if pool is None else _pool_figures(pool_name, pool),
    )


@router.post("/notes", status_code=201)
async def create_note(body: NoteCreate, request: Request, tenant: CurrentTenant) -> Note:
    """Add a note for the ``X-Tenant-ID`` tenant."""
    # The connection is taken here rather than by a dependency: FastAPI solves dependencies
    # even when the body fails validation, and a 422 should cost no checkout.
    async with tenant_scope(request) as conn:
        row = await conn.fetchrow(
            "INSERT INTO notes (body) VALUES ($1) RETURNING id, body", body.body
        )
    assert row is not None
    return Note(id=row["id"], body=row["body"], tenant=tenant)


@router.get("/notes")
async def list_notes(conn: EndpointConnection, tenant: CurrentTenant) -> list[Note]:
    """The ``X-Tenant-ID`` tenant's notes, oldest first; no other tenant's."""
    rows = await conn.fetch("SELECT id, body FROM notes ORDER BY id")
    return [Note(id=row["id"], body=row["body"], tenant=tenant) for row in rows]


router.add_route("/health", health_endpoint, methods=["GET"])
router.add_route("/metrics", metrics_endpoint(), methods=["GET"])


def _pool_figures(name: str, pool: PoolStats) -> PoolFigures:
    return PoolFigures(
        name=name,
        size=pool.size,
        in_use=pool.in_use,
        idle=pool.idle,
        waiting=pool.waiting,
        min_size=pool.min_size,
        max_size=pool.max_size,
    )


# -- error responses: always JSON {"detail": ...} ----------------------------------------------


async def _validation_error(request: Request, exc: Exception) -> Response:
    """422 as FastAPI would, except a bad ``id`` or ``isolation`` on POST /tenants: 400."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if request.method == "POST" and request.url.path == "/tenants":
        fields = [
            err["loc"][1]
            for err in errors
            if len(err["loc"]) == 2 and err["loc"][0] == "body" and err["loc"][1] in _FIELD_ERRORS
        ]
        if errors and len(fields) == len(errors):
            detail = "; ".join(_FIELD_ERRORS[f] for f in dict.fromkeys(fields))
            return JSONResponse({"detail": detail}, status_code=400)
    # ASCII-escaped: the errors echo the input, which may hold lone surrogates (valid JSON,
    # but not encodable as UTF-8).
    content = json.dumps({"detail": jsonable_encoder(errors)}, separators=(",", ":"))
    return Response(content, status_code=422, media_type="application/json")


async def _conflict(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log (Starlette re-raises after this); the client learns nothing.
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
