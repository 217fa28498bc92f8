"""``TenantMiddleware``: pure ASGI, it names each HTTP request's tenant for what runs below it."""

from __future__ import annotations

import sys

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import TenantPoolError
from .._manager import TenantPoolManager
from .._tenant import validate_tenant_id
from ._context import RequestTenant, end_scope, manager_for, request_var, state_manager
from ._errors import error_response, http_exception_response
from ._sources import RequestFinder, TenantSource, from_header, from_request

__all__ = ["TenantMiddleware"]


class TenantMiddleware:
    """Finds, validates and sets the tenant of each HTTP request.

    The tenant comes from ``source`` (default: the ``X-Tenant-ID`` header); a plain callable
    is taken as ``from_request(callable)``. A malformed id is answered with a 400 here. With
    ``eager=False`` (the default) no connection is checked out until a dependency or
    ``tenant_scope`` asks for one, so routes that never touch the database cost nothing; with
    ``eager=True`` the tenant's scope is opened before the application runs and closed after
    the response (an unknown tenant is then a 404 before any endpoint runs), and
    ``manager.current_connection()`` works anywhere in the request's task.

    The manager is ``manager``, else the one ``manager_lifespan`` put into lifespan state.
    Written as plain ASGI, not ``BaseHTTPMiddleware``, which runs the application in another
    task and so would hide the scope. Lifespan and websocket scopes pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        source: TenantSource | RequestFinder | None = None,
        *,
        manager: TenantPoolManager | None = None,
        eager: bool = False,
    ) -> None:
        self.app = app
        if source is None:
            source = from_header()
        elif not isinstance(source, TenantSource):
            source = from_request(source)
        self.source: TenantSource = source
        self.manager = manager
        self.eager = eager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        source = self.source
        try:
            tenant = await source.find(scope)
            if tenant is not None:
                validate_tenant_id(tenant)
        except TenantPoolError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except HTTPException as exc:
            await http_exception_response(exc)(scope, receive, send)
            return
        inner = scope if tenant is None else source.route(scope, tenant)
        # Recorded now, so that background tasks and deep code find it without the request.
        manager = self.manager if self.manager is not None else state_manager(scope)
        found = RequestTenant(tenant, source.description, manager)
        token = request_var.set(found)
        try:
            if tenant is None or not self.eager:
                await self._serve(found, inner, receive, send)
                return
            opened = manager_for(scope).with_connection(tenant)
            try:
                await opened.__aenter__()
            except TenantPoolError as exc:
                await error_response(exc)(scope, receive, send)
                return
            found.resolved = True
            found.eager = opened
            try:
                await self._serve(found, inner, receive, send)
            finally:
                # A scope's exit gives the connection back even when cancelled: it does not
                # await, or (a per-transaction commit) releases in a finally.
                await end_scope(opened, sys.exc_info()[1])
        finally:
            request_var.reset(token)

    async def _serve(
        self, found: RequestTenant, scope: Scope, receive: Receive, send: Send
    ) -> None:
        async def send_committed(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Per transaction, a response must not report work that then fails to commit.
                await found.commit_before_response()
            await send(message)

        try:
            await self.app(scope, receive, send_committed)
        finally:
            # After the response and background tasks: the end of RequestConnection's hold.
            await found.release(sys.exc_info()[1])

    def __repr__(self) -> str:
        mode = "eager" if self.eager else "lazy"
        return f"<TenantMiddleware {mode}, tenant from {self.source.description}>"
