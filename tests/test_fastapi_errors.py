"""tenantpool's errors as HTTP: status, JSON body, Retry-After, and nothing leaked."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import logging
import math

import pytest
from _asgi import held, serve, shared
from _postgres import PostgresCluster
from _support import drained
from fastapi import FastAPI, HTTPException, Request

from tenantpool import (
    ConnectionReleased,
    PoolSettings,
    PoolTimeout,
    Target,
    TenantPoolManager,
    TenantUnavailable,
)
from tenantpool.fastapi import (
    PoolManager,
    RequestConnection,
    TenantMiddleware,
    error_response,
    from_request,
    install_error_handlers,
    manager_lifespan,
)
from tenantpool.fastapi._errors import retry_after

pytestmark = pytest.mark.anyio

SECRET = "s3cret-pw"
DOWN_DSN = f"postgresql://x:{SECRET}@127.0.0.1:1/db"


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
async def test_every_error_maps_to_its_status_and_json(
    pg: PostgresCluster, eager: bool, caplog: pytest.LogCaptureFixture
) -> None:
    targets = {**shared(pg.dsn(), "acme"), "down": Target(DOWN_DSN)}
    settings = PoolSettings(max_size=1, acquire_timeout=0.2)
    manager = TenantPoolManager(targets, pool=settings)
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, eager=eager)
    install_error_handlers(app)

    @app.get("/who")
    async def who(conn: RequestConnection) -> str:
        return str(await conn.fetchval("SELECT current_setting('app.tenant_id')"))

    @app.get("/invalid")
    async def invalid(pool: PoolManager) -> None:
        async with pool.with_connection("not a tenant"):
            raise AssertionError("unreachable")

    async with serve(app) as (client, _):

        async def get(tenant: str | None, path: str = "/who") -> tuple[int, object, str | None]:
            headers = {} if tenant is None else {"X-Tenant-ID": tenant}
            response = await client.get(path, headers=headers)
            assert response.headers["content-type"] == "application/json"
            for leak in (SECRET, "postgresql", "127.0.0.1", "Traceback"):
                assert leak not in response.text
            return response.status_code, response.json(), response.headers.get("retry-after")

        assert await get("acme") == (200, "acme", None)
        assert await get(None) == (
            400,
            {"detail": "this route needs a tenant; expected in the X-Tenant-ID header"},
            None,
        )
        status, body, _ = await get("acme; DROP TABLE x")
        assert status == 400
        assert body == {
            "detail": "invalid tenant id: expected 1-63 letters, digits, '_' or '-', starting"
            " with a letter or digit"
        }
        assert (await get("acme", "/invalid"))[0] == 400  # raised by the endpoint's own code
        assert await get("nobody") == (404, {"detail": "unknown tenant"}, None)

        async with held(manager, "acme"):  # the pool's only connection
            assert await get("acme") == (
                503,
                {"detail": "no database connection became free in time; retry later"},
                "1",
            )
        status, body, after = await get("down")
        assert (status, body) == (
            503,
            {"detail": "the tenant's database is unavailable; retry later"},
        )
        assert after is not None and after.isdigit() and int(after) >= 1

        await drained(manager)
        await manager.close()
        assert await get("acme") == (
            503,
            {"detail": "the database connections are shut down"},
            None,
        )
    # Operators get the reason in the log, still without the password.
    assert "TenantUnavailable" in caplog.text and "PoolTimeout" in caplog.text
    assert SECRET not in caplog.text


async def test_http_exceptions_from_a_tenant_source_are_json(pg: PostgresCluster) -> None:
    def bearer(request: Request) -> str | None:
        token = request.headers.get("authorization", "")
        if not token.startswith("Bearer tenant="):
            raise HTTPException(401, "bad token", headers={"WWW-Authenticate": "Bearer"})
        return token.removeprefix("Bearer tenant=")

    manager = TenantPoolManager(shared(pg.dsn(), "acme"))
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware, source=from_request(bearer))

    @app.get("/who")
    async def who(conn: RequestConnection) -> str:
        return str(await conn.fetchval("SELECT current_setting('app.tenant_id')"))

    async with serve(app) as (client, _):
        response = await client.get("/who", headers={"Authorization": "Bearer tenant=acme"})
        assert response.json() == "acme"
        response = await client.get("/who", headers={"Authorization": "Basic x"})
        assert (response.status_code, response.json()) == (401, {"detail": "bad token"})
        assert response.headers["www-authenticate"] == "Bearer"
        await drained(manager)


def test_retry_after_is_whole_seconds_rounded_up_at_least_one() -> None:
    cases = {0.0: "1", 0.2: "1", 1.0: "1", 1.01: "2", 2.5: "3", 30.0: "30"}
    for seconds, header in cases.items():
        assert retry_after(seconds) == header
    for odd in (math.inf, math.nan, -5.0):
        assert retry_after(odd) == "1"


def test_error_response_headers_and_unmapped_errors() -> None:
    response = error_response(PoolTimeout("from postgresql://u@h/db", retry_after=4.2))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert b"postgresql" not in response.body
    response = error_response(TenantUnavailable("down", retry_after=0.01))
    assert response.headers["retry-after"] == "1"
    # A scope's connection used after it ended is a bug in the app: a plain 500.
    response = error_response(ConnectionReleased("tenant 'acme' ..."))
    assert (response.status_code, response.body) == (500, b'{"detail":"Internal Server Error"}')


def test_logging_stays_quiet_for_client_errors(caplog: pytest.LogCaptureFixture) -> None:
    from tenantpool import InvalidTenant, UnknownTenant

    with caplog.at_level(logging.INFO, logger="tenantpool.fastapi"):
        assert error_response(InvalidTenant("x")).status_code == 400
        assert error_response(UnknownTenant("x")).status_code == 404
    assert caplog.records == []
