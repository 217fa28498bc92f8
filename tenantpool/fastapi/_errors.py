"""tenantpool's errors as HTTP responses: a status, ``{"detail": ...}``, and ``Retry-After``."""

from __future__ import annotations

import logging
import math

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._errors import (
    InvalidTenant,
    ManagerClosed,
    NoCurrentConnection,
    PoolTimeout,
    TenantPoolError,
    TenantUnavailable,
    UnknownTenant,
)
from ._context import request_var

__all__ = ["error_response", "http_exception_response", "install_error_handlers", "retry_after"]

logger = logging.getLogger("tenantpool.fastapi")

# Fixed texts rather than the exceptions' messages: those name pools (host, port, user) and
# echo raw input, which a client has no business seeing.
_ERRORS: dict[type[TenantPoolError], tuple[int, str]] = {
    InvalidTenant: (
        400,
        "invalid tenant id: expected 1-63 letters, digits, '_' or '-', starting with a letter"
        " or digit",
    ),
    UnknownTenant: (404, "unknown tenant"),
    NoCurrentConnection: (400, "this route needs a tenant"),
    PoolTimeout: (503, "no database connection became free in time; retry later"),
    TenantUnavailable: (503, "the tenant's database is unavailable; retry later"),
    ManagerClosed: (503, "the database connections are shut down"),
}


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))


def error_response(exc: TenantPoolError) -> Response:
    """The JSON response for ``exc``; a 500 for errors with no mapping (a bug, not a request)."""
    for cls in type(exc).__mro__:
        if cls in _ERRORS:
            status, detail = _ERRORS[cls]
            break
    else:
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
    headers: dict[str, str] = {}
    if isinstance(exc, NoCurrentConnection):
        found = request_var.get()
        if found is not None and found.tenant is None:
            detail = f"this route needs a tenant; expected in {found.source}"
    if isinstance(exc, PoolTimeout | TenantUnavailable):
        headers["Retry-After"] = retry_after(exc.retry_after)
    if status >= 500:
        # The message is password-free (a contract of the core); operators need the pool name.
        logger.warning("%s: %s", type(exc).__name__, exc)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def http_exception_response(exc: HTTPException) -> Response:
    """What Starlette's own handler answers for ``exc``, for errors raised before routing."""
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TenantPoolError)  # registered for TenantPoolError classes only
    return error_response(exc)


def install_error_handlers(app: Starlette) -> None:
    """Answer tenantpool's errors with JSON: 400, 404 or 503 (``Retry-After`` where it helps).

    A mounted sub-application handles its own errors: call this on it too.
    """
    for cls in _ERRORS:
        app.add_exception_handler(cls, _handle)
