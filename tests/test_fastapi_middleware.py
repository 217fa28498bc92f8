"""TenantMiddleware: where tenants come from, what passes through, what is reset."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import base64
import json
from typing import Any

import pytest
from _asgi import http_scope, serve, shared, stalled_receive
from _postgres import PostgresCluster
from _support import drained
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from tenantpool import TenantPoolManager
from tenantpool.fastapi import (
    CurrentTenant,
    RequestConnection,
    TenantMiddleware,
    current_request,
    from_header,
    from_path_prefix,
    from_request,
    from_scope,
    from_subdomain,
    install_error_handlers,
    manager_lifespan,
)

pytestmark = pytest.mark.anyio

SETTING = "SELECT current_setting('app.tenant_id')"


def with_host(host: str) -> dict[str, Any]:
    scope = http_scope("/")
    scope["headers"] = [(b"host", host.encode())]
    return scope


async def test_header_source() -> None:
    source = from_header("X-Tenant")
    assert await source.find(http_scope("/")) is None
    assert await source.find(http_scope("/", [("X-Tenant", "acme")])) == "acme"
    assert await source.find(http_scope("/", [("x-tenant", "")])) == ""  # refused as invalid
    with pytest.raises(HTTPException, match="given 2 times") as info:
        await source.find(http_scope("/", [("X-Tenant", "acme"), ("X-Tenant", "globex")]))
    assert info.value.status_code == 400
    assert repr(source) == "<TenantSource the X-Tenant header>"


async def test_subdomain_source() -> None:
    source = from_subdomain(".Example.com")
    cases = {
        "acme.example.com": "acme",
        "ACME.Example.COM.:8443": "acme",
        "example.com": None,
        "acme.example.org": None,
        "notexample.com": None,
        "a.b.example.com": "a.b",  # refused as invalid: one level names a tenant
        "[::1]:8000": None,
        "": None,
    }
    for host, tenant in cases.items():
        assert await source.find(with_host(host)) == tenant, host
    with pytest.raises(ValueError, match="base_domain"):
        from_subdomain("..")


async def test_path_prefix_source() -> None:
    source = from_path_prefix("/t/")
    cases = {"/t/acme/notes": "acme", "/t/acme": "acme", "/t/": None, "/t": None, "/x/acme": None}
    for path, tenant in cases.items():
        assert await source.find(http_scope(path)) == tenant, path
    scope = http_scope("/t/acme/notes")
    routed = source.route(scope, "acme")
    assert (routed["path"], routed["root_path"]) == ("/t/acme/notes", "/t/acme")
    assert scope["root_path"] == ""  # the caller's scope is left alone
    # Under a mount, the prefix is looked for below the mount's root_path.
    mounted = {**http_scope("/api/t/acme/x"), "root_path": "/api"}
    assert await source.find(mounted) == "acme"
    assert source.route(mounted, "acme")["root_path"] == "/api/t/acme"
    assert await from_path_prefix("").find(http_scope("/acme/x")) == "acme"


async def test_callable_sources_sync_and_async() -> None:
    def sync_finder(request: Request) -> str | None:
        return request.query_params.get("tenant")

    async def async_finder(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"x-t", b"").decode() or None

    scope = http_scope("/", [("X-T", "globex")])
    scope["query_string"] = b"tenant=acme"
    assert await from_request(sync_finder).find(scope) == "acme"
    assert await from_scope(async_finder).find(scope) == "globex"
    assert repr(from_scope(async_finder)) == "<TenantSource async_finder>"


async def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[tuple[str, object]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            current_request()
        except RuntimeError:
            seen.append((scope["type"], None))
        else:
            seen.append((scope["type"], "set"))

    middleware = TenantMiddleware(inner, eager=True)

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent for a passed-through scope")

    for kind in ("lifespan", "websocket"):
        scope = {**http_scope("/", [("X-Tenant-ID", "not valid!")]), "type": kind}
        await middleware(scope, stalled_receive(), send)
    assert seen == [("lifespan", None), ("websocket", None)]
    assert repr(middleware) == "<TenantMiddleware eager, tenant from the X-Tenant-ID header>"


async def test_subdomain_tenants_end_to_end(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, source=from_subdomain("example.com"))
    install_error_handlers(app)

    @app.get("/who")
    async def who(conn: RequestConnection) -> str:
        return str(await conn.fetchval(SETTING))

    async with serve(app, base_url="http://globex.example.com") as (client, _):
        assert (await client.get("/who")).json() == "globex"
        response = await client.get("http://acme.example.com/who")
        assert response.json() == "acme"
        response = await client.get("http://example.com/who")
        assert response.status_code == 400
        assert response.json() == {
            "detail": "this route needs a tenant; expected in a subdomain of example.com"
        }
        assert (await client.get("http://x.y.example.com/who")).status_code == 400
        await drained(manager)


async def test_path_prefix_tenants_end_to_end(pg: PostgresCluster) -> None:
    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, source=from_path_prefix("/t"))
    install_error_handlers(app)

    @app.get("/notes", name="notes")
    async def notes(request: Request, conn: RequestConnection, tenant: CurrentTenant) -> Any:
        return {
            "setting": await conn.fetchval(SETTING),
            "tenant": tenant,
            "url": str(request.url_for("notes")),
        }

    @app.get("/health")
    async def health() -> str:
        return "up"

    async with serve(app) as (client, _):
        response = await client.get("/t/globex/notes")
        assert response.json() == {
            "setting": "globex",
            "tenant": "globex",
            "url": "http://test/t/globex/notes",
        }
        assert (await client.get("/health")).json() == "up"  # outside the prefix: no tenant
        assert (await client.get("/t/nobody/notes")).status_code == 404
        assert (await client.get("/t/bad%20id/notes")).status_code == 400
        assert (await client.get("/notes")).status_code == 400
        await drained(manager)


async def test_jwt_claim_as_the_tenant(pg: PostgresCluster) -> None:
    def claim(request: Request) -> str | None:
        # Signature checking is the app's business; the point is reading a claim.
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not token:
            return None
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(data["tenant"])

    def token(tenant: str) -> str:
        body = base64.urlsafe_b64encode(json.dumps({"tenant": tenant}).encode()).rstrip(b"=")
        return f"Bearer e30.{body.decode()}.sig"

    manager = TenantPoolManager(shared(pg.dsn(), "acme", "globex"))
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, source=claim)  # a bare callable gets the Request
    install_error_handlers(app)

    @app.get("/who")
    async def who(conn: RequestConnection) -> str:
        return str(await conn.fetchval(SETTING))

    async with serve(app) as (client, _):
        for tenant in ("acme", "globex"):
            response = await client.get("/who", headers={"Authorization": token(tenant)})
            assert response.json() == tenant
        response = await client.get("/who", headers={"Authorization": token("no/pe")})
        assert response.status_code == 400
        await drained(manager)
