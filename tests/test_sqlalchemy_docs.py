"""docs/sqlalchemy.md runs as written: its SQL, its FastAPI app, its helpers, its SQLModel app."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _asgi import serve
from _postgres import PostgresCluster, quote_ident, unique_name
from _support import drained

pytestmark = pytest.mark.anyio

PAGE = Path(__file__).resolve().parent.parent / "docs" / "sqlalchemy.md"
DOC_DSN = "postgresql://app:secret@localhost:5432/app"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", PAGE.read_text(), re.S | re.M)


def run(code: str, dsn: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    namespace = namespace if namespace is not None else {"__name__": "docs_snippet"}
    # dont_inherit: the page's code runs without this module's postponed annotations, as a
    # reader's module would; SQLAlchemy and FastAPI read the annotations.
    exec(compile(code.replace(DOC_DSN, dsn), str(PAGE), "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
async def app_login(pg: PostgresCluster, login: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    """The page's SQL, run in a schema of the test's own that is the login's search_path;
    yields the login's DSN, standing in for the page's ``app``, and the schema."""
    schema = unique_name("sa_docs")
    role = quote_ident(login[0])
    (sql,) = blocks("sql")
    await pg.execute(f"CREATE SCHEMA {quote_ident(schema)}")
    await pg.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {role}")
    await pg.execute(f"ALTER ROLE {role} SET search_path = {quote_ident(schema)}")
    await pg.execute(
        f"SET search_path = {quote_ident(schema)};" + sql.replace(" TO app;", f" TO {role};")
    )
    yield pg.dsn(*login), schema
    await pg.drop_schema(schema)


async def rows_as_superuser(pg: PostgresCluster, schema: str) -> list[tuple[Any, ...]]:
    records = await pg.fetch(
        f"SELECT id, tenant, body FROM {quote_ident(schema)}.notes ORDER BY id"
    )
    return [tuple(r) for r in records]


async def exercise(client: Any) -> list[dict[str, Any]]:
    """Notes for two tenants through the app; each reads back exactly its own."""
    made = []
    for tenant, body in (("acme", "a1"), ("globex", "g1"), ("acme", "a2")):
        response = await client.post("/notes", json={"body": body}, headers={"X-Tenant-ID": tenant})
        assert response.status_code == 201, response.text
        made.append(response.json())
    assert [(m["tenant"], m["body"]) for m in made] == [
        ("acme", "a1"),
        ("globex", "g1"),
        ("acme", "a2"),
    ]
    for tenant in ("acme", "globex"):
        got = await client.get("/notes", headers={"X-Tenant-ID": tenant})
        assert got.json() == [m for m in made if m["tenant"] == tenant]
    assert (await client.get("/notes")).status_code == 400
    assert (await client.get("/notes", headers={"X-Tenant-ID": "nobody"})).status_code == 404
    return made


def test_the_page_has_its_blocks() -> None:
    fastapi_app, helpers, sqlmodel_app = blocks("python")
    assert "TenantSession" in fastapi_app and DOC_DSN in fastapi_app
    assert "tenant_session(manager, tenant)" in helpers
    assert "from sqlmodel" in sqlmodel_app and "class_=AsyncSession" in sqlmodel_app


async def test_the_fastapi_app_and_the_helpers_run(
    pg: PostgresCluster, login: tuple[str, str], app_login: tuple[str, str]
) -> None:
    dsn, schema = app_login
    fastapi_app, helpers, _ = blocks("python")
    namespace = run(helpers, dsn, run(fastapi_app, dsn))
    manager = namespace["manager"]
    async with serve(namespace["app"]) as (client, _):
        made = await exercise(client)
        assert await rows_as_superuser(pg, schema) == [
            (m["id"], m["tenant"], m["body"]) for m in made
        ]
        assert await namespace["count_notes"]("acme") == 2
        assert await namespace["count_notes"]("globex") == 1
        assert await namespace["copy_note"]("globex", "g2") == ["g1", "g2"]
        await drained(manager)
        # Every server connection of the app's role is one of tenantpool's: the sessions
        # opened none of their own.
        backends = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
        assert await pg.fetchval(backends, login[0]) == manager.stats().total


async def test_the_sqlmodel_app_runs(pg: PostgresCluster, app_login: tuple[str, str]) -> None:
    dsn, schema = app_login
    _, _, sqlmodel_app = blocks("python")
    namespace = run(sqlmodel_app, dsn)
    async with serve(namespace["app"]) as (client, _):
        made = await exercise(client)
    assert await rows_as_superuser(pg, schema) == [(m["id"], m["tenant"], m["body"]) for m in made]
