"""The apps of ``benchmarks/sqlalchemy.py``: ``GET /notes`` as an ORM ``select``, three ways.

uvicorn factories, configured through the environment: ``BENCH_SA_DSN`` (a non-superuser
login, so row-level security applies), ``BENCH_SA_TABLE``, ``BENCH_SA_TENANTS``
(comma-separated) and ``BENCH_SA_POOL``. Each answers a tenant's rows as JSON.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool.fastapi import TenantMiddleware, install_error_handlers, manager_lifespan
from tenantpool.sqlalchemy import TenantSession

from ._http_apps import _request_tenant

ENV = os.environ


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = ENV.get("BENCH_SA_TABLE", "notes")
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str]
    body: Mapped[str]


SELECT_NOTES = select(Note).order_by(Note.id)


def _config() -> tuple[str, frozenset[str], int]:
    return (
        ENV["BENCH_SA_DSN"],
        frozenset(ENV["BENCH_SA_TENANTS"].split(",")),
        int(ENV["BENCH_SA_POOL"]),
    )


def _as_json(notes: Any) -> list[dict[str, Any]]:
    return [{"id": n.id, "tenant": n.tenant, "body": n.body} for n in notes]


def _asyncpg_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


def plain_sqlalchemy() -> FastAPI:
    """The usual way: one engine and its pool, the tenant set in each transaction."""
    dsn, tenants, size = _config()
    engine = create_async_engine(_asyncpg_url(dsn), pool_size=size, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    set_tenant = text("SELECT set_config('app.tenant_id', :tenant, true)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    async def tenant_db(request: Request) -> AsyncIterator[AsyncSession]:
        tenant = _request_tenant(request, tenants)
        async with sessions() as session, session.begin():
            # Forgetting this line, or a transaction opened without it, reads no tenant's rows.
            await session.execute(set_tenant, {"tenant": tenant})
            yield session

    app = FastAPI(lifespan=lifespan)

    @app.get("/notes")
    async def notes(session: Annotated[AsyncSession, Depends(tenant_db)]) -> list[dict[str, Any]]:
        return _as_json(await session.scalars(SELECT_NOTES))

    return app


def tenantpool_session(state_scope: Literal["session", "transaction"] = "session") -> FastAPI:
    """tenantpool: the middleware names the tenant, ``TenantSession`` is its session."""
    dsn, tenants, size = _config()
    targets = {t: Target(dsn, settings={"app.tenant_id": t}) for t in tenants}
    settings = PoolSettings(max_size=size, state_scope=state_scope)
    manager = TenantPoolManager(targets, pool=settings)
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)

    @app.get("/notes")
    async def notes(session: TenantSession) -> list[dict[str, Any]]:
        return _as_json(await session.scalars(SELECT_NOTES))

    return app


def tenantpool_session_per_transaction() -> FastAPI:
    """The same with every scope one transaction, the tenant set in it as plain SQLAlchemy does."""
    return tenantpool_session("transaction")


def fastapi_tenancy() -> FastAPI:
    """fastapi-tenancy 0.5's RLS provider: one engine, ``set_config`` in every transaction."""
    from fastapi_tenancy import (
        InMemoryTenantStore,
        TenancyConfig,
        TenancyManager,
        TenancyMiddleware,
        Tenant,
    )
    from fastapi_tenancy.dependencies import make_tenant_db_dependency

    dsn, tenants, size = _config()
    config = TenancyConfig(
        database_url=_asyncpg_url(dsn),
        resolution_strategy="header",
        isolation_strategy="rls",
        database_pool_size=size,
        database_max_overflow=0,
        database_pool_pre_ping=False,
    )
    store = InMemoryTenantStore()
    manager = TenancyManager(config, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for tenant in sorted(tenants):
            await store.create(Tenant(id=tenant, identifier=tenant, name=tenant))
        async with manager.create_lifespan()(app):
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(TenancyMiddleware, manager=manager)
    tenant_db = make_tenant_db_dependency(manager)

    @app.get("/notes")
    async def notes(session: Annotated[AsyncSession, Depends(tenant_db)]) -> list[dict[str, Any]]:
        return _as_json(await session.scalars(SELECT_NOTES))

    return app
