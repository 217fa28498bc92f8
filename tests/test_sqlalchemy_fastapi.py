"""``TenantSession``: the request tenant's AsyncSession in FastAPI, on the request's connection."""

# No "from __future__ import annotations": FastAPI reads the annotations of endpoints defined
# inside the tests.

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _asgi import serve, shared
from _postgres import PostgresCluster, quote_ident, unique_name
from _support import drained
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tenantpool import ConnectionReleased, PoolSettings, TenantPoolManager
from tenantpool.fastapi import (
    RequestConnection,
    TenantMiddleware,
    install_error_handlers,
    manager_lifespan,
)
from tenantpool.sqlalchemy import TenantSession

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(
        server_default=text("current_setting('app.tenant_id', true)")
    )
    name: Mapped[str]


def make_app(manager: TenantPoolManager) -> FastAPI:
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)

    @app.post("/items")
    async def add(name: str, session: TenantSession) -> dict[str, Any]:
        item = Item(name=name)
        session.add(item)
        await session.commit()
        return {"id": item.id, "tenant": item.tenant, "name": item.name}

    @app.get("/items")
    async def items(session: TenantSession) -> list[dict[str, Any]]:
        rows = await session.scalars(select(Item).order_by(Item.id))
        return [{"id": i.id, "tenant": i.tenant, "name": i.name} for i in rows]

    return app


@pytest.fixture
async def rls_items(pg: PostgresCluster, login: tuple[str, str]) -> Any:
    """An ``items`` table under FORCE ROW LEVEL SECURITY in a schema of the test's own."""
    schema = unique_name("sa_web")
    s, role = quote_ident(schema), quote_ident(login[0])
    await pg.execute(
        f"""
        CREATE SCHEMA {s};
        CREATE TABLE {s}.items (id serial PRIMARY KEY, name text NOT NULL,
            tenant text NOT NULL DEFAULT current_setting('app.tenant_id', true));
        ALTER TABLE {s}.items ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {s}.items FORCE ROW LEVEL SECURITY;
        CREATE POLICY by_tenant ON {s}.items
            USING (tenant = current_setting('app.tenant_id', true));
        GRANT USAGE ON SCHEMA {s} TO {role};
        GRANT SELECT, INSERT ON {s}.items TO {role};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {role};
        ALTER ROLE {role} SET search_path = {s};
        """
    )
    yield schema
    await pg.drop_schema(schema)


@pytest.mark.parametrize("state_scope", ["session", "transaction"])
async def test_each_request_gets_its_tenants_rows(
    pg: PostgresCluster, login: tuple[str, str], rls_items: str, state_scope: Any
) -> None:
    one = PoolSettings(max_size=1, state_scope=state_scope)
    manager = TenantPoolManager(shared(pg.dsn(*login), "acme", "globex"), pool=one)
    async with serve(make_app(manager)) as (client, _):
        made = []
        for n, tenant in enumerate(["acme", "globex", "acme", "globex", "acme"]):
            response = await client.post(f"/items?name=i{n}", headers={"X-Tenant-ID": tenant})
            assert response.status_code == 200, response.text
            made.append(response.json())
        assert [(m["tenant"], m["name"]) for m in made] == [
            ("acme", "i0"),
            ("globex", "i1"),
            ("acme", "i2"),
            ("globex", "i3"),
            ("acme", "i4"),
        ]
        for tenant in ("acme", "globex"):
            response = await client.get("/items", headers={"X-Tenant-ID": tenant})
            assert response.json() == [m for m in made if m["tenant"] == tenant]
        assert (await client.get("/items")).status_code == 400
        assert (await client.get("/items", headers={"X-Tenant-ID": "nobody"})).status_code == 404
        await drained(manager)
        # Row by row from outside: one row per request, each in its own tenant's name.
        rows = await pg.fetch(f"SELECT id, tenant, name FROM {quote_ident(rls_items)}.items")
        assert sorted(tuple(r) for r in rows) == [(m["id"], m["tenant"], m["name"]) for m in made]
        # Every request's session rode the pool's one connection.
        assert manager.stats().total == 1


async def test_the_session_is_on_the_request_connection_and_closed_after_the_response(
    pg: PostgresCluster, login: tuple[str, str], rls_items: str
) -> None:
    manager = TenantPoolManager(shared(pg.dsn(*login), "acme"))
    app = make_app(manager)
    kept: list[AsyncSession] = []

    async def count_later(session: AsyncSession) -> None:
        # A background task runs before the dependency exits: the session still works.
        kept.append(session)
        assert (await session.scalar(select(func.count(Item.id)))) == 1

    @app.post("/uncommitted")
    async def uncommitted(
        conn: RequestConnection, session: TenantSession, background: BackgroundTasks
    ) -> dict[str, Any]:
        pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        session.add(Item(name="never committed"))
        await session.flush()
        background.add_task(count_later, session)
        return {"same": pid == conn.get_server_pid(), "checkouts": manager.stats().checkouts}

    async with serve(app) as (client, _):
        before = manager.stats().checkouts
        response = await client.post("/uncommitted", headers={"X-Tenant-ID": "acme"})
        assert response.json() == {"same": True, "checkouts": before + 1}
        await drained(manager)
        assert len(kept) == 1
        with pytest.raises(ConnectionReleased):
            await kept[0].execute(select(Item))
        assert (await client.get("/items", headers={"X-Tenant-ID": "acme"})).json() == []
    assert await pg.fetchval(f"SELECT count(*) FROM {quote_ident(rls_items)}.items") == 0


def test_tenant_session_does_not_need_fastapi() -> None:
    """Without FastAPI, ``tenant_session`` imports and ``TenantSession`` says what is missing."""
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "import tenantpool.sqlalchemy as m\n"
        "assert callable(m.tenant_session)\n"
        "try:\n"
        "    m.TenantSession\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "needs FastAPI: pip install 'tenantpool[fastapi]'" in out.stdout


async def test_per_transaction_the_session_ends_with_the_endpoint(
    pg: PostgresCluster, login: tuple[str, str], rls_items: str
) -> None:
    """The request's transaction commits as the response starts: by then the session has rolled
    back what it did not commit, and is closed."""
    per_transaction = PoolSettings(max_size=1, state_scope="transaction")
    manager = TenantPoolManager(shared(pg.dsn(*login), "acme"), pool=per_transaction)
    app = make_app(manager)
    kept: list[AsyncSession] = []

    @app.post("/half")
    async def half(session: TenantSession, conn: RequestConnection) -> dict[str, Any]:
        session.add(Item(name="committed"))
        await session.commit()
        session.add(Item(name="never committed"))
        await session.flush()
        kept.append(session)
        return {"in_transaction": conn.is_in_transaction()}

    async with serve(app) as (client, _):
        response = await client.post("/half", headers={"X-Tenant-ID": "acme"})
        assert response.json() == {"in_transaction": True}
        await drained(manager)
        with pytest.raises(ConnectionReleased, match="used after it ended"):
            await kept[0].execute(select(Item))
    names = await pg.fetch(f"SELECT tenant, name FROM {quote_ident(rls_items)}.items")
    assert [tuple(r) for r in names] == [("acme", "committed")]
