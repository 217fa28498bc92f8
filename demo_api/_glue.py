"""Temporary: the few pieces of ``tenantpool.fastapi`` the demo needs, over the core API.

Delete this module when ``tenantpool.fastapi`` is on main: the names here mirror it
(``STATE_KEY``, ``EndpointConnection``, ``CurrentTenant``, ``install_error_handlers``,
``health_endpoint``, ``metrics_endpoint``), so the swap is an import and a middleware.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tenantpool import (
    InvalidTenant,
    ManagerClosed,
    PoolTimeout,
    TenantConnection,
    TenantPoolError,
    TenantPoolManager,
    TenantUnavailable,
    UnknownTenant,
)

__all__ = [
    "STATE_KEY",
    "CurrentTenant",
    "EndpointConnection",
    "health_endpoint",
    "install_error_handlers",
    "manager_for",
    "metrics_endpoint",
]

STATE_KEY = "tenantpool_manager"
HEADER = "X-Tenant-ID"

_ERRORS: dict[type[TenantPoolError], tuple[int, str]] = {
    InvalidTenant: (
        400,
        "invalid tenant id: expected 1-63 letters, digits, '_' or '-', starting with a letter"
        " or digit",
    ),
    UnknownTenant: (404, "unknown tenant"),
    PoolTimeout: (503, "no database connection became free in time; retry later"),
    TenantUnavailable: (503, "the tenant's database is unavailable; retry later"),
    ManagerClosed: (503, "the database connections are shut down"),
}


def manager_for(request: Request) -> TenantPoolManager:
    """The manager the lifespan put into the state."""
    manager = getattr(request.state, STATE_KEY, None)
    if not isinstance(manager, TenantPoolManager):
        raise RuntimeError("no TenantPoolManager in the lifespan state")
    return manager


async def current_tenant(request: Request) -> str:
    """The ``X-Tenant-ID`` header's tenant, known to the resolver; 400 or 404 otherwise."""
    tenant = request.headers.get(HEADER)
    if tenant is None:
        raise HTTPException(400, f"this route needs a tenant; expected in header {HEADER}")
    await manager_for(request).resolve(tenant)
    return tenant


async def tenant_connection(
    request: Request, tenant: Annotated[str, Depends(current_tenant)]
) -> AsyncIterator[TenantConnection]:
    async with manager_for(request).with_connection(tenant) as conn:
        yield conn


CurrentTenant = Annotated[str, Depends(current_tenant)]
EndpointConnection = Annotated[TenantConnection, Depends(tenant_connection, scope="function")]


def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TenantPoolError)
    for cls in type(exc).__mro__:
        if cls in _ERRORS:
            status, detail = _ERRORS[cls]
            break
    else:
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
    headers = {}
    if isinstance(exc, PoolTimeout | TenantUnavailable):
        seconds = exc.retry_after if math.isfinite(exc.retry_after) else 1.0
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """tenantpool's errors as JSON: 400, 404 or 503 with ``Retry-After``."""
    for cls in _ERRORS:
        app.add_exception_handler(cls, _error_response)


async def health_endpoint(request: Request) -> JSONResponse:
    """200 for ``ok`` and ``degraded``, 503 for ``failing``; the body is ``as_dict()``."""
    report = await manager_for(request).health()
    return JSONResponse(
        report.as_dict(),
        status_code=503 if report.status == "failing" else 200,
        headers={"Cache-Control": "no-store"},
    )


def metrics_endpoint() -> Callable[[Request], Awaitable[Response]]:
    """The manager's figures in Prometheus' text format (the series names of
    ``tenantpool.fastapi.metrics``, a subset)."""

    async def endpoint(request: Request) -> Response:
        stats = manager_for(request).stats()
        lines: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP tenantpool_{name} {help_}")
            lines.append(f"# TYPE tenantpool_{name} {kind}")
            lines.extend(f"tenantpool_{name}{labels} {value}" for labels, value in samples)

        states = ("in_use", "idle")
        family(
            "connections",
            "gauge",
            "Open connections over all pools, by state.",
            [(f'{{state="{s}"}}', getattr(stats, s)) for s in states]
            + [('{state="other"}', stats.total - stats.in_use - stats.idle)],
        )
        if stats.max_total is not None:
            family("max_connections", "gauge", "The cap across pools.", [("", stats.max_total)])
        family("waiting", "gauge", "Checkouts queued.", [("", stats.waiting)])
        family("pools", "gauge", "Pools the manager knows.", [("", len(stats.pools))])
        family(
            "pool_connections",
            "gauge",
            "Connections of each pool, by state.",
            [
                (f'{{pool="{_label(name)}",state="{s}"}}', getattr(pool, s))
                for name, pool in sorted(stats.pools.items())
                for s in states
            ],
        )
        for name, help_ in (
            ("checkouts", "Completed checkouts."),
            ("timeouts", "PoolTimeout raised."),
            ("steals", "Idle connections closed for another pool at the cap."),
        ):
            family(f"{name}_total", "counter", help_, [("", getattr(stats, name))])
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return endpoint


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
