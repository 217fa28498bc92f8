"""Helpers for the web integration tests: run an app's lifespan, talk to it, drive it raw."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Message, Receive

from tenantpool import Target, TenantPoolManager

__all__ = ["held", "http_scope", "serve", "shared", "stalled_receive"]


def shared(dsn: str, *tenants: str) -> dict[str, Target]:
    """Tenants on one DSN, each with its RLS-style setting, so a query can tell who it ran for."""
    return {t: Target(dsn, settings={"app.tenant_id": t}) for t in tenants}


@asynccontextmanager
async def serve(
    app: ASGIApp, base_url: str = "http://test"
) -> AsyncIterator[tuple[httpx.AsyncClient, LifespanManager]]:
    """The app with its lifespan running (httpx's transport does not run it) and a client."""
    async with LifespanManager(app) as lifespan:
        transport = httpx.ASGITransport(app=lifespan.app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client, lifespan


def http_scope(
    path: str, headers: Iterable[tuple[str, str]] = (), method: str = "GET"
) -> dict[str, Any]:
    """A raw HTTP scope, for driving an ASGI app without a client in between."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")] + [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


def stalled_receive(disconnect_after: anyio.Event | None = None) -> Receive:
    """A receive() that delivers an empty body, then blocks until ``disconnect_after`` is set
    and reports the client gone; without an event it blocks forever."""
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_after is None:
            await anyio.sleep_forever()
        await disconnect_after.wait()
        return {"type": "http.disconnect"}

    return receive


@asynccontextmanager
async def held(manager: TenantPoolManager, tenant: str) -> AsyncIterator[None]:
    """Keep one of ``tenant``'s connections checked out by another task meanwhile.

    Another task, because httpx's ASGI transport runs the app in the caller's task: a scope
    held by the test itself would be reused by the request, as nested scopes are.
    """
    taken, done = anyio.Event(), anyio.Event()

    async def hold() -> None:
        async with manager.with_connection(tenant):
            taken.set()
            await done.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await taken.wait()
        try:
            yield
        finally:
            done.set()
