"""Passwords full of URL-special characters, fed through every surface a password could leak by.

Each piece of the password between two special characters is a word of its own, so that a
password cut at a ``#``, ``?``, ``/`` or ``@`` (as ``urlsplit`` cuts it) is caught too.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from _asgi import serve
from _postgres import PostgresCluster, unique_name
from _support import drained
from fastapi import FastAPI

from tenantpool import (
    PoolSettings,
    Target,
    TenantPoolManager,
    TenantUnavailable,
    redact_dsn,
)
from tenantpool.fastapi import (
    RequestConnection,
    TenantMiddleware,
    health_endpoint,
    install_error_handlers,
    manager_lifespan,
)
from tenantpool.fastapi.metrics import metrics_endpoint

pytestmark = pytest.mark.anyio

WORDS = ("alpha1", "bravo2", "charlie3", "delta4", "echo5", "foxtrot6", "golf7", "hotel8")
# Every character a URL or a libpq string treats specially, between distinctive words.
PASSWORD = "alpha1#bravo2?charlie3/delta4@echo5:foxtrot6%golf7 hotel8'&=\\\""


def leaks(text: str) -> list[str]:
    """The words of the password found in ``text``: none, or the password leaked."""
    return [word for word in WORDS if word in text]


def url(user: str, password: str, host: str, port: int, database: str = "postgres") -> str:
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


# -- DSNs that asyncpg and libpq may read differently are refused, quoting nothing ----------------


@pytest.mark.parametrize("special", ["#", "?", "/", "@"])
def test_an_unencoded_special_character_in_the_password_is_refused(special: str) -> None:
    dsn = url("app", f"alpha1{special}bravo2", "db", 5432)
    with pytest.raises(ValueError, match="ambiguous") as raised:
        Target(dsn)
    assert leaks(str(raised.value)) == []
    assert "%" in str(raised.value)  # it says how to write the password instead
    with pytest.raises(ValueError, match="ambiguous") as raised:
        redact_dsn(dsn)
    assert leaks(str(raised.value)) == []


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:alpha1bravo2/db",  # no host: the password would read as a port
        "postgresql://app:alpha1@db/app?bravo2",  # a malformed query
        "app:alpha1@db/bravo2",  # no scheme
    ],
)
def test_other_malformed_dsns_are_refused_quoting_nothing(dsn: str) -> None:
    with pytest.raises(ValueError) as raised:
        Target(dsn)
    assert leaks(str(raised.value)) == []


def test_names_come_from_the_parsed_parameters() -> None:
    encoded = quote(PASSWORD, safe="")
    dsn = f"postgresql://app:{encoded}@db:5432,[::1]:5433/app?sslmode=prefer&password={encoded}"
    assert redact_dsn(dsn) == "postgresql://app@db:5432,[::1]:5433/app?sslmode=prefer"
    # An unencoded ':' is read the same by asyncpg and libpq: part of the password.
    assert redact_dsn("postgresql://app:alpha1:bravo2@db/app") == "postgresql://app@db/app"
    target = Target(dsn, schema="s")
    assert leaks(repr(target)) == leaks(str(target)) == []


# -- every surface of a running manager ------------------------------------------------------


@pytest.fixture
async def login(pg: PostgresCluster) -> AsyncIterator[str]:
    name = unique_name("secret_login")
    await pg.create_role(name, PASSWORD)
    yield name
    await pg.drop_role(name)


def make_app(manager: TenantPoolManager) -> FastAPI:
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)
    app.add_route("/health", health_endpoint)
    app.add_route("/metrics", metrics_endpoint())

    @app.get("/one")
    async def one(conn: RequestConnection) -> int:
        return int(await conn.fetchval("SELECT 1"))

    return app


async def test_no_surface_shows_the_password(
    pg: PostgresCluster, login: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = url(login, quote(PASSWORD, safe=""), pg.host, pg.port)
    # The same characters, wrong by one word: the server refuses it.
    wrong = url(login, quote(PASSWORD.replace("hotel8", "india9"), safe=""), pg.host, pg.port)
    # An unencoded ':' is fine, and the query's password too.
    colon = url(login, "alpha1:bravo2", pg.host, pg.port) + "?application_name=x"
    in_query = f"postgresql://{login}@{pg.host}:{pg.port}/postgres?password={quote(PASSWORD)}"
    targets = {
        "good": Target(good, settings={"app.tenant_id": "good"}),
        "query": Target(in_query),
        "wrong": Target(wrong),
        "colon": Target(colon),
    }
    manager = TenantPoolManager(
        targets,
        pool=PoolSettings(max_size=2),
        reconnect_jitter=False,
        reconnect_delay=30,
        reconnect_delay_max=30,
    )
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with serve(make_app(manager)) as (client, _):
            for tenant in ("good", "query"):
                response = await client.get("/one", headers={"X-Tenant-ID": tenant})
                assert response.status_code == 200, response.text
            for tenant in ("wrong", "colon"):  # refused by the server: backing off
                response = await client.get("/one", headers={"X-Tenant-ID": tenant})
                assert response.status_code == 503
                texts.append(response.text)
            for tenant in ("wrong", "colon"):
                with pytest.raises(TenantUnavailable) as raised:
                    async with manager.with_connection(tenant):
                        pass
                texts += [str(raised.value), repr(raised.value)]
                cause = raised.value.__cause__
                texts += [str(cause), repr(cause)] if cause is not None else []
            async with manager.with_connection("good") as conn:
                texts += [repr(conn), str(conn)]
            await drained(manager)
            stats = manager.stats()
            texts += [repr(stats), *stats.pools, *(repr(p) for p in stats.pools.values())]
            report = await manager.health()
            texts += [repr(report), str(report.as_dict())]
            texts += [(await client.get("/health")).text, (await client.get("/metrics")).text]
            texts += [repr(manager), *(repr(p) for p in manager._pools.values())]
            texts += [repr(t) for t in targets.values()]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]
    assert any("backing_off" in t or "backing off" in t for t in texts)  # the surfaces ran
    assert any(record.levelno == logging.WARNING for record in caplog.records)
    for text in texts:
        assert leaks(text) == [], text
    assert login in "".join(stats.pools)  # names still say who connects
