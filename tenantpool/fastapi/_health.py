"""Health: the manager's report as a dependency, and as a ready-made endpoint."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import JSONResponse

from .._health import HealthReport
from ._context import manager_for

__all__ = ["Health", "health_endpoint", "health_report"]


async def health_report(request: Request) -> HealthReport:
    """``await manager.health()`` for the request's manager."""
    return await manager_for(request.scope).health()


Health = Annotated[HealthReport, Depends(health_report)]
"""The request's manager's ``HealthReport``."""


async def health_endpoint(request: Request) -> JSONResponse:
    """200 for ``ok`` and ``degraded``, 503 for ``failing``; the body is ``report.as_dict()``.

    A plain Starlette endpoint: ``app.add_route("/health", health_endpoint)`` in FastAPI,
    ``Route("/health", health_endpoint)`` in Starlette.
    """
    report = await health_report(request)
    return JSONResponse(
        report.as_dict(),
        status_code=503 if report.status == "failing" else 200,
        # A cached "ok" would hide an outage from the load balancer asking.
        headers={"Cache-Control": "no-store"},
    )
