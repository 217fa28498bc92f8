"""FastAPI dependencies over the request's tenant, and ``tenant_scope`` for everything else.

``RequestConnection`` holds one connection for the whole request. It is a plain dependency:
``TenantMiddleware`` ends its scope once the application is done with the request, after the
response is sent and after background tasks, so the connection serves a streaming body and
``BackgroundTasks`` too, and no request pays for FastAPI's ``yield``-dependency machinery.
``EndpointConnection`` is released as soon as the endpoint returns (a ``yield`` dependency with
``Depends(scope="function")``), which frees it earlier for endpoints that neither stream nor
hand it to a background task; used later it raises ``ConnectionReleased``. The two are
alternatives: an endpoint should take one of them.

Per session, releasing never raises and never awaits (the core's scope exit is synchronous),
so no dependency exit can fail after the response has gone out. The transaction's commit can
fail, which is why ``TransactionConnection`` ends with the endpoint: the client then learns of
it. Per transaction (``state_scope="transaction"``) the scope is the transaction: its commit
is ``EndpointConnection``'s exit, before the response, and ``RequestConnection``'s release,
after it (a failure there is logged); an error out of the application rolls it back. Inside
it, ``TransactionConnection`` is a savepoint.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection, Request

from .._manager import TenantPoolManager
from .._scope import TenantConnection
from ._context import current_request, manager_for

__all__ = [
    "CurrentTenant",
    "EndpointConnection",
    "PoolManager",
    "RequestConnection",
    "TransactionConnection",
    "current_tenant",
    "pool_manager",
    "request_connection",
    "tenant_connection",
    "tenant_scope",
    "tenant_transaction",
]

logger = logging.getLogger("tenantpool.fastapi")


@asynccontextmanager
async def tenant_scope(request: HTTPConnection | None = None) -> AsyncIterator[TenantConnection]:
    """``async with tenant_scope(request) as conn``: the request tenant's connection.

    For Starlette endpoints, background tasks and code deep in the stack; ``request`` may be
    left out, the middleware having recorded the tenant and the manager. Inside an open scope
    of the same tenant it reuses that scope's connection.
    """
    found = current_request()
    tenant = found.require_tenant()
    manager = manager_for(request.scope if request is not None else None)
    async with manager.with_connection(tenant) as conn:
        found.resolved = True
        yield conn


async def pool_manager(request: Request) -> TenantPoolManager:
    """The request's ``TenantPoolManager`` (from the middleware, else from lifespan state)."""
    return manager_for(request.scope)


async def current_tenant(request: Request) -> str:
    """The request's tenant id, known to the resolver; 400 if none was given, 404 if unknown."""
    found = current_request()
    tenant = found.require_tenant()
    if not found.resolved:
        await manager_for(request.scope).resolve(tenant)
        found.resolved = True
    return tenant


async def request_connection(request: Request) -> TenantConnection:
    """The request tenant's connection, held until the response is sent (background tasks too).

    A plain dependency, not a ``yield`` one: ``TenantMiddleware`` gives the connection back
    when the request is done, which spares every request FastAPI's exit-stack machinery.
    """
    return await current_request().connection(manager_for(request.scope))


async def tenant_connection(request: Request) -> AsyncIterator[TenantConnection]:
    """Yields the request tenant's connection; released when the dependency's scope ends."""
    # tenant_scope's body, without its context-manager layer: this runs on every request.
    found = current_request()
    tenant = found.require_tenant()
    async with manager_for(request.scope).with_connection(tenant) as conn:
        found.resolved = True
        yield conn


async def tenant_transaction(
    conn: Annotated[TenantConnection, Depends(request_connection)],
) -> AsyncIterator[TenantConnection]:
    """Yields the request's connection inside a transaction: commit on success, else rollback."""
    transaction = conn.transaction()
    await transaction.start()
    # Only Exception rolls back here: when cancelled no await may complete, and the release
    # rolls the transaction back in its reset anyway.
    try:
        yield conn
    except Exception:
        try:
            await transaction.rollback()
        except Exception as exc:
            # The release resets a connection left in a transaction (or closes it): keep the
            # endpoint's error, which is the one worth reporting.
            logger.warning("rollback failed: %s: %s", type(exc).__name__, exc)
        raise
    await transaction.commit()


RequestConnection = Annotated[TenantConnection, Depends(request_connection)]
"""The request tenant's connection, held until the response is sent (background tasks too)."""

EndpointConnection = Annotated[TenantConnection, Depends(tenant_connection, scope="function")]
"""The request tenant's connection, released as soon as the endpoint returns."""

TransactionConnection = Annotated[TenantConnection, Depends(tenant_transaction, scope="function")]
"""The request's connection in a transaction, committed before the response is sent."""

CurrentTenant = Annotated[str, Depends(current_tenant)]
"""The request's tenant id, checked with the resolver."""

PoolManager = Annotated[TenantPoolManager, Depends(pool_manager)]
"""The request's ``TenantPoolManager``."""
