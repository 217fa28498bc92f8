"""tenantpool.sqlalchemy on the real cluster: ORM and SQLModel sessions on tenants' connections.

Four tenants on one login role and one pool: ``acme`` and ``globex`` share tables under FORCE
ROW LEVEL SECURITY, ``initech`` and ``umbrella`` have a schema each. Every isolation check reads
the tables back as the superuser and compares them row by row with what each tenant wrote.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import asyncpg
import pytest
import sqlalchemy.exc
from _postgres import PostgresCluster, quote_ident, unique_name
from _support import ServerSampler, drained
from sqlalchemy import ForeignKey, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload
from sqlmodel import Field, SQLModel
from sqlmodel import select as sqlmodel_select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelSession

from tenantpool import (
    ConnectionReleased,
    InvalidTenant,
    NoCurrentConnection,
    PoolSettings,
    Target,
    TenantPoolManager,
)
from tenantpool.sqlalchemy import _prepare_cached, _server_connection, tenant_session

pytestmark = pytest.mark.anyio

RLS_TENANTS = ("acme", "globex")
SCHEMA_TENANTS = ("initech", "umbrella")
TENANTS = RLS_TENANTS + SCHEMA_TENANTS
WHO = "current_setting('app.tenant_id', true)"


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(server_default=text(WHO))
    body: Mapped[str]
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    tags: Mapped[list[Tag]] = relationship(back_populates="note", order_by="Tag.id")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(server_default=text(WHO))
    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"))
    name: Mapped[str]
    note: Mapped[Note] = relationship(back_populates="tags")


class Memo(SQLModel, table=True):
    __tablename__ = "memos"
    id: int | None = Field(default=None, primary_key=True)
    tenant: str | None = Field(default=None, sa_column_kwargs={"server_default": text(WHO)})
    body: str


TABLES = """
CREATE TABLE {s}.notes (id serial PRIMARY KEY, tenant text NOT NULL DEFAULT {who},
                        body text NOT NULL, meta jsonb NOT NULL);
CREATE TABLE {s}.tags (id serial PRIMARY KEY, tenant text NOT NULL DEFAULT {who},
                       note_id int NOT NULL REFERENCES {s}.notes, name text NOT NULL);
CREATE TABLE {s}.memos (id serial PRIMARY KEY, tenant text DEFAULT {who}, body text NOT NULL);
GRANT USAGE ON SCHEMA {s} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {role};
"""
RLS = """
ALTER TABLE {s}.{t} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {s}.{t} FORCE ROW LEVEL SECURITY;
CREATE POLICY by_tenant ON {s}.{t} USING (tenant = {who});
"""


@dataclass
class World:
    pg: PostgresCluster
    role: str
    schemas: dict[str, str]  # tenant -> the schema its tables are in
    state_scope: Literal["session", "transaction"]

    def manager(self, max_size: int = 2) -> TenantPoolManager:
        dsn = self.pg.dsn(self.role, "pw")
        # Every tenant carries its id as a setting, so that each row records who wrote it;
        # only the RLS tenants' tables filter on it.
        targets = {
            t: Target(dsn, schema=self.schemas[t], settings={"app.tenant_id": t}) for t in TENANTS
        }
        settings = PoolSettings(max_size=max_size, state_scope=self.state_scope)
        return TenantPoolManager(targets, pool=settings)

    async def rows(self, tenant: str, table: str, columns: str) -> list[tuple[Any, ...]]:
        """What the table ``tenant`` uses holds, read as the superuser, RLS bypassed."""
        schema = quote_ident(self.schemas[tenant])
        records = await self.pg.fetch(f"SELECT {columns} FROM {schema}.{table} ORDER BY id")
        return [tuple(r) for r in records]


# Per transaction every scope is one transaction, and a session's transactions nest in it as
# savepoints: every test runs both ways.
@pytest.fixture(params=["session", "transaction"])
async def world(pg: PostgresCluster, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    role = unique_name("sa_app")
    await pg.create_role(role, "pw")
    rls = unique_name("sa_rls")
    schemas = {t: rls for t in RLS_TENANTS} | {t: unique_name(f"sa_{t}") for t in SCHEMA_TENANTS}
    for schema in set(schemas.values()):
        s = quote_ident(schema)
        await pg.execute(f"CREATE SCHEMA {s}")
        await pg.execute(TABLES.format(s=s, who=WHO, role=quote_ident(role)))
    for table in ("notes", "tags", "memos"):
        await pg.execute(RLS.format(s=quote_ident(rls), t=table, who=WHO))
    yield World(pg, role, schemas, request.param)
    for schema in set(schemas.values()):
        await pg.drop_schema(schema)
    await pg.drop_role(role)


async def write_notes(manager: TenantPoolManager, tenant: str) -> None:
    async with tenant_session(manager, tenant) as session:
        for n in range(2):
            note = Note(body=f"{tenant} {n}", meta={"by": tenant, "n": n})
            note.tags = [Tag(name=f"{tenant} {n} {k}") for k in range(2)]
            session.add(note)
        await session.commit()


# --------------------------------------------------------------------------- the ORM end to end


async def test_each_tenant_reads_and_writes_only_its_own_rows(world: World) -> None:
    async with world.manager() as manager:
        for tenant in TENANTS:
            await write_notes(manager, tenant)

        for tenant in TENANTS:
            async with tenant_session(manager, tenant) as session:
                notes = (await session.scalars(select(Note).options(selectinload(Note.tags)))).all()
                assert [(n.tenant, n.body, n.meta) for n in notes] == [
                    (tenant, f"{tenant} {n}", {"by": tenant, "n": n}) for n in range(2)
                ]
                assert [[(t.tenant, t.name) for t in n.tags] for n in notes] == [
                    [(tenant, f"{tenant} {n} {k}") for k in range(2)] for n in range(2)
                ]
                # Lazy loading, the asyncio way, walks the same rows back.
                session.expunge_all()
                tag = (await session.scalars(select(Tag).order_by(Tag.id))).first()
                assert tag is not None
                note = await tag.awaitable_attrs.note
                assert (note.tenant, note.body) == (tenant, f"{tenant} 0")

        # Row by row from outside: each row was written by the tenant whose table holds it,
        # and the RLS tenants' shared table holds exactly both tenants' rows.
        for tenant in TENANTS:
            shared = RLS_TENANTS if tenant in RLS_TENANTS else (tenant,)
            rows = await world.rows(tenant, "notes", "tenant, body, meta::text")
            assert [(t, b, json.loads(m)) for t, b, m in rows] == [
                (t, f"{t} {n}", {"by": t, "n": n}) for t in shared for n in range(2)
            ]
            assert await world.rows(tenant, "tags", "tenant, name") == [
                (t, f"{t} {n} {k}") for t in shared for n in range(2) for k in range(2)
            ]
        await drained(manager)


async def test_a_tenant_cannot_touch_another_tenants_rows(world: World) -> None:
    async with world.manager() as manager:
        for tenant in TENANTS:
            await write_notes(manager, tenant)
        before = {t: await world.rows(t, "notes", "id, tenant, body") for t in TENANTS}
        globex_ids = [row[0] for row in before["globex"] if row[1] == "globex"]

        async with tenant_session(manager, "acme") as session:
            for note_id in globex_ids:
                assert await session.get(Note, note_id) is None
            changed = await session.execute(
                update(Note).where(Note.id.in_(globex_ids)).values(body="taken")
            )
            assert changed.rowcount == 0  # type: ignore[attr-defined]
            await session.commit()
            # Writing a row in another tenant's name breaks the policy's check.
            session.add(Note(tenant="globex", body="forged", meta={}))
            with pytest.raises(sqlalchemy.exc.ProgrammingError, match="row-level security"):
                await session.commit()

        async with tenant_session(manager, "initech") as session:
            await session.execute(update(Note).values(body="initech was here"))
            await session.commit()

        after = {t: await world.rows(t, "notes", "id, tenant, body") for t in TENANTS}
        assert after["initech"] == [
            (i, "initech", "initech was here") for i, _, _ in before["initech"]
        ]
        for tenant in ("acme", "globex", "umbrella"):
            assert after[tenant] == before[tenant]
        await drained(manager)


async def test_a_sqlmodel_model_through_sqlmodels_session(world: World) -> None:
    async with world.manager() as manager:
        for tenant in TENANTS:
            async with tenant_session(manager, tenant, class_=SQLModelSession) as session:
                assert isinstance(session, SQLModelSession)
                session.add(Memo(body=f"memo of {tenant}"))
                await session.commit()
        for tenant in TENANTS:
            async with tenant_session(manager, tenant, class_=SQLModelSession) as session:
                memos = (await session.exec(sqlmodel_select(Memo))).all()
                assert [(m.tenant, m.body) for m in memos] == [(tenant, f"memo of {tenant}")]
        for tenant in TENANTS:
            shared = RLS_TENANTS if tenant in RLS_TENANTS else (tenant,)
            assert await world.rows(tenant, "memos", "tenant, body") == [
                (t, f"memo of {t}") for t in shared
            ]


# --------------------------------------------------------------------------- transactions


async def test_uncommitted_work_is_rolled_back_when_the_block_ends(world: World) -> None:
    async with world.manager(max_size=1) as manager:
        async with tenant_session(manager, "acme") as session:
            session.add(Note(body="kept", meta={}))
            await session.commit()
            session.add(Note(body="flushed, never committed", meta={}))
            await session.flush()

        with pytest.raises(RuntimeError, match="boom"):
            async with tenant_session(manager, "acme") as session:
                async with session.begin():
                    session.add(Note(body="in a failed transaction", meta={}))
                    await session.flush()
                    raise RuntimeError("boom")

        async with tenant_session(manager, "acme") as session:
            async with session.begin():
                session.add(Note(body="begin() commits", meta={}))
            session.add(Note(body="rolled back explicitly", meta={}))
            await session.flush()
            await session.rollback()

        assert await world.rows("acme", "notes", "body") == [("kept",), ("begin() commits",)]
        await drained(manager)


async def test_the_current_scopes_connection_and_its_tenant(world: World) -> None:
    async with world.manager() as manager:
        with pytest.raises(NoCurrentConnection):
            async with tenant_session(manager):
                pass
        for bad in ("", "no such!", 42):
            with pytest.raises(InvalidTenant):
                async with tenant_session(manager, bad):  # type: ignore[arg-type]
                    pass

        async with manager.with_connection("globex") as conn:
            async with tenant_session(manager) as session:
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                assert pid == conn.get_server_pid()
                session.add(Note(body="from the session", meta={}))
                await session.commit()
            # The same tenant named explicitly inside its scope shares the scope's connection.
            async with tenant_session(manager, "globex") as session:
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                assert pid == conn.get_server_pid()
            # The session's commit is visible to the scope's own asyncpg calls.
            assert await conn.fetchval("SELECT body FROM notes") == "from the session"
            assert manager.stats().checkouts == 1
        await drained(manager)


async def test_a_session_used_after_its_scope_ended_fails_clearly(world: World) -> None:
    async with world.manager() as manager:
        async with tenant_session(manager, "acme") as kept:
            await kept.execute(select(Note))
        with pytest.raises(ConnectionReleased, match="used after it ended"):
            await kept.execute(select(Note))
        kept.add(Note(body="too late", meta={}))
        with pytest.raises(ConnectionReleased):
            await kept.commit()

        async with manager.with_connection("globex"):
            async with tenant_session(manager) as inner:
                pass
            # Its scope is still open, but the session's block has ended.
            with pytest.raises(ConnectionReleased):
                await inner.execute(select(Note))
        assert await world.rows("acme", "notes", "body") == []
        await drained(manager)


async def test_inside_a_scopes_own_transaction_the_session_nests_as_a_savepoint(
    world: World,
) -> None:
    """What ``PoolSettings(state_scope="transaction")`` will do to a session: the scope is one
    transaction (opened here by hand the way asyncpg opens one), SQLAlchemy's BEGIN becomes a
    savepoint inside it, and the session's work lasts only if the scope's transaction commits."""
    async with world.manager(max_size=1) as manager:
        async with manager.with_connection("acme") as conn:
            async with conn.transaction():
                async with tenant_session(manager) as session:
                    session.add(Note(body="committed in the session", meta={}))
                    await session.commit()  # RELEASE SAVEPOINT
                    session.add(Note(body="left uncommitted", meta={}))
                    await session.flush()  # rolled back to the savepoint when the block ends
                assert conn.is_in_transaction()
                bodies = await conn.fetch("SELECT body FROM notes")
                assert [r["body"] for r in bodies] == ["committed in the session"]
                # Nothing is visible outside the scope's transaction yet.
                assert await world.rows("acme", "notes", "body") == []
        assert await world.rows("acme", "notes", "body") == [("committed in the session",)]

        with pytest.raises(RuntimeError, match="scope failed"):
            async with manager.with_connection("acme") as conn, conn.transaction():
                async with tenant_session(manager) as session:
                    session.add(Note(body="committed, then the scope failed", meta={}))
                    await session.commit()
                raise RuntimeError("scope failed")
        assert await world.rows("acme", "notes", "body") == [("committed in the session",)]
        await drained(manager)


# --------------------------------------------------------------------------- connections


async def test_sessions_open_no_server_connection_of_their_own(world: World) -> None:
    """80 sessions, 20 at a time over four tenants, ride the pool's two backends."""
    async with world.manager(max_size=2) as manager:
        seen: list[int] = []

        async def one(i: int) -> None:
            tenant = TENANTS[i % len(TENANTS)]
            async with tenant_session(manager, tenant) as session:
                session.add(Note(body=f"note {i}", meta={"i": i}))
                await session.commit()
                seen.append((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
                notes = (await session.scalars(select(Note).where(Note.body == f"note {i}"))).all()
                assert [(n.tenant, n.meta) for n in notes] == [(tenant, {"i": i})]

        with ServerSampler(world.pg.superuser_dsn, world.role) as sampler:
            for batch in range(4):
                async with anyio.create_task_group() as tg:
                    for i in range(batch * 20, batch * 20 + 20):
                        tg.start_soon(one, i)
        assert len(seen) == 80
        assert len(set(seen)) <= 2
        assert sampler.peak <= 2
        await drained(manager)
        stats = manager.stats()
        assert stats.total == len(set(seen))  # nothing was closed along the way
        assert stats.checkouts == 80


async def test_json_decodes_as_sqlalchemy_expects_only_inside_sessions(world: World) -> None:
    """The codecs a session needs do not change what raw asyncpg use of the connection sees."""
    query = """SELECT '{"a": [1, "x"]}'::jsonb AS b, '{"a": 1}'::json AS j, $1::jsonb AS p"""
    fresh = await asyncpg.connect(world.pg.dsn(world.role, "pw"))
    try:
        plain = dict(await fresh.fetchrow(query, '{"p": true}'))
    finally:
        await fresh.close()
    assert plain == {"b": '{"a": [1, "x"]}', "j": '{"a": 1}', "p": '{"p": true}'}

    async with world.manager(max_size=1) as manager:
        async with manager.with_connection("acme") as conn:
            pid = conn.get_server_pid()
            assert dict(await conn.fetchrow(query, '{"p": true}')) == plain
            async with tenant_session(manager) as session:
                typed = text(query.replace("$1::jsonb", "CAST(:p AS jsonb)")).bindparams(
                    bindparam("p", type_=JSONB)
                )
                row = (await session.execute(typed, {"p": {"p": True}})).one()
                assert tuple(row) == ({"a": [1, "x"]}, {"a": 1}, {"p": True})
            assert dict(await conn.fetchrow(query, '{"p": true}')) == plain
        await drained(manager)
        async with manager.with_connection("globex") as conn:
            assert conn.get_server_pid() == pid  # not closed for the codecs
            assert dict(await conn.fetchrow(query, '{"p": true}')) == plain
            with pytest.raises(asyncpg.DataError, match="expected str, got dict"):
                await conn.fetchval("SELECT $1::jsonb", {"a": 1})
        await drained(manager)


async def test_cancelled_mid_query_leaves_nothing_checked_out(world: World) -> None:
    async with world.manager(max_size=1) as manager:
        started = anyio.Event()

        async def stuck() -> None:
            async with tenant_session(manager, "acme") as session:
                session.add(Note(body="never committed", meta={}))
                await session.flush()
                started.set()
                await session.execute(text("SELECT pg_sleep(60)"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await started.wait()
            with anyio.fail_after(30):
                while not await world.pg.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
                    " AND usename = $1 AND state = 'active'",
                    world.role,
                ):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

        await drained(manager, limit=30)
        async with tenant_session(manager, "acme") as session:
            assert (await session.scalars(select(Note))).all() == []


# --------------------------------------------------------------------------- past public APIs


async def test_the_two_reaches_past_public_apis_still_hold(world: World) -> None:
    """``_server_connection`` (tenantpool's proxy) and asyncpg's cached ``_prepare``: if either
    library changes, this fails here, by name, rather than somewhere inside a session."""
    async with world.manager(max_size=1) as manager:
        async with manager.with_connection("acme") as conn:
            raw = _server_connection(conn)
            assert isinstance(raw, asyncpg.Connection)
            assert raw.get_server_pid() == conn.get_server_pid()
            query = "SELECT 1 AS tenantpool_sa_probe"
            first = await _prepare_cached(conn, query)
            second = await _prepare_cached(conn, query, name=None)
            assert await first.fetchval() == await second.fetchval() == 1
            # One server-side statement for both: the second came from asyncpg's cache. Per
            # transaction the cache is off (a pooler may switch server connections between
            # transactions) and statements are unnamed, so none outlives its use.
            count = "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1"
            cached = world.state_scope == "session"
            assert await conn.fetchval(count, query) == (1 if cached else 0)
        await drained(manager)


async def test_a_plain_asyncsession_is_what_it_yields(world: World) -> None:
    async with world.manager() as manager:
        async with tenant_session(manager, "acme") as session:
            assert type(session) is AsyncSession
            session.add(note := Note(body="x", meta={}))
            await session.commit()
            assert note.body == "x"  # not expired by the commit: no implicit IO needed
        async with tenant_session(manager, "acme", expire_on_commit=True) as session:
            session.add(note := Note(body="y", meta={}))
            await session.commit()
            assert "body" in sqlalchemy.inspect(note).expired_attributes
        with pytest.raises(TypeError, match="binds the session"):
            async with tenant_session(manager, "acme", bind=None):
                pass
