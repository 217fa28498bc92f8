"""The request's tenant as the middleware found it, and where a request's manager comes from."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar

from starlette.types import Scope

from .._errors import NoCurrentConnection
from .._manager import TenantPoolManager, _ScopeContext
from .._scope import TenantConnection

__all__ = [
    "STATE_KEY",
    "RequestTenant",
    "current_request",
    "end_scope",
    "manager_for",
    "request_var",
    "state_manager",
]

# The key under which manager_lifespan puts the manager into the lifespan state, so that it is
# ``request.state.tenantpool_manager`` in endpoints.
STATE_KEY = "tenantpool_manager"

logger = logging.getLogger("tenantpool.fastapi")


async def end_scope(opened: _ScopeContext, exc: BaseException | None) -> None:
    """Exit a scope the middleware holds for a request whose response has gone out."""
    try:
        await opened.__aexit__(type(exc) if exc is not None else None, exc, None)
    except Exception as error:
        # Only a per-transaction scope's commit can fail here; its client has its answer.
        logger.error(
            "tenantpool: the request's transaction did not commit after its response was"
            " sent: %s: %s",
            type(error).__name__,
            error,
        )


class RequestTenant:
    """What ``TenantMiddleware`` found for one request: the tenant id (or none), and where."""

    __slots__ = ("_before_commit", "_held", "eager", "manager", "resolved", "source", "tenant")

    def __init__(self, tenant: str | None, source: str, manager: TenantPoolManager | None) -> None:
        self.tenant = tenant
        self.source = source
        self.manager = manager
        # Set once the resolver has confirmed the tenant exists, so that it is asked once.
        self.resolved = False
        # The scope RequestConnection opened, with its connection; the middleware ends it.
        self._held: tuple[_ScopeContext, TenantConnection] | None = None
        # The scope the middleware opened before the application ran (eager mode).
        self.eager: _ScopeContext | None = None
        # What must end before the request's transaction commits (tenantpool.sqlalchemy's
        # sessions, whose savepoints the commit would take along).
        self._before_commit: list[Callable[[], Awaitable[None]]] = []

    async def connection(self, manager: TenantPoolManager) -> TenantConnection:
        """The request's connection, checked out on first use and held until ``release``."""
        if self._held is None:
            opened = manager.with_connection(self.require_tenant())
            conn = await opened.__aenter__()
            self._held = (opened, conn)
            self.resolved = True
        return self._held[1]

    async def release(self, exc: BaseException | None = None) -> None:
        """End the scope ``connection`` opened, the application having raised ``exc`` (if any).

        Per session it never suspends, so it is never cut short. Per transaction
        (``state_scope="transaction"``) it commits what ran after the response started (a
        streaming body, background tasks), or rolls back after ``exc``; the response has gone
        out by then, so a failed commit is logged, not raised.
        """
        held, self._held = self._held, None
        if held is not None:
            await end_scope(held[0], exc)

    async def commit_before_response(self) -> None:
        """Per transaction, commit what the request did so far: its response is about to say
        it was done. Per session, or with no scope open, nothing happens."""
        callbacks, self._before_commit = self._before_commit, []
        for callback in callbacks:
            await callback()
        for opened in (self.eager, self._held[0] if self._held is not None else None):
            if opened is not None:
                await opened.commit_and_continue()

    def before_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` when the response starts, before the request's transaction commits."""
        self._before_commit.append(callback)

    def require_tenant(self) -> str:
        if self.tenant is None:
            raise NoCurrentConnection(f"this route needs a tenant; expected in {self.source}")
        return self.tenant

    def __repr__(self) -> str:
        return f"<RequestTenant {self.tenant!r} from {self.source}>"


# A ContextVar rather than a scope key: code deep in the stack and background tasks find it
# without being handed the request, and it survives scope copies made by sub-applications.
request_var: ContextVar[RequestTenant | None] = ContextVar("tenantpool_request", default=None)


def current_request() -> RequestTenant:
    """The request's tenant; ``RuntimeError`` when no ``TenantMiddleware`` ran for it."""
    found = request_var.get()
    if found is None:
        raise RuntimeError(
            "no request tenant: add tenantpool.fastapi.TenantMiddleware to the application"
            " (it serves HTTP requests; websocket connections pass through it untouched)"
        )
    return found


def state_manager(scope: Scope) -> TenantPoolManager | None:
    """The manager ``manager_lifespan`` put into the lifespan state, if any."""
    state = scope.get("state")
    manager = state.get(STATE_KEY) if isinstance(state, Mapping) else None
    return manager if isinstance(manager, TenantPoolManager) else None


def manager_for(scope: Scope | None) -> TenantPoolManager:
    """The manager the middleware recorded for this request, else the lifespan state's."""
    found = request_var.get()
    if found is not None and found.manager is not None:
        return found.manager
    manager = state_manager(scope) if scope is not None else None
    if manager is not None:
        return manager
    raise RuntimeError(
        "no TenantPoolManager for this request: run the application with"
        " lifespan=manager_lifespan(...), or pass manager= to TenantMiddleware"
    )
