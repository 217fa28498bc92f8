"""SQLAlchemy 2 and SQLModel on tenantpool (``pip install tenantpool[sqlalchemy]``).

``tenant_session(manager)`` gives an ``AsyncSession`` whose connection is the current scope's
tenantpool connection; ``tenant_session(manager, "acme")`` opens a scope of its own on
``acme``. In FastAPI, ``TenantSession`` is the request tenant's session, on the connection
``RequestConnection`` gives.

How it fits SQLAlchemy, through its public API only:

* One ``AsyncEngine`` per manager, with ``NullPool`` and an ``async_creator`` that hands the
  dialect the scope's connection, wrapped in ``_LentConnection``: SQLAlchemy's ``close()``
  and ``terminate()`` give the connection back to the scope instead of closing it (tenantpool
  releases it when the scope ends), so a session never costs a server connection.
* SQLAlchemy's asyncpg dialect sets json/jsonb codecs on every connection it is given.
  asyncpg keeps codecs for the connection's life, and tenantpool closes a connection whose
  codecs user code changed. Instead, each server connection gets, once, codecs that decode
  the way SQLAlchemy's do while a session uses the connection and the way asyncpg's built-in
  ones do otherwise (``_JsonCodecs``): raw asyncpg use of the same connection in a later
  scope sees exactly what it would have seen without SQLAlchemy, and nothing is closed.
* The session's transactions are SQLAlchemy's own (``session.commit()``, ``session.begin()``);
  whatever is not committed when the block ends is rolled back before the scope ends. Under a
  scope that is itself one transaction (``state_scope="transaction"``), SQLAlchemy's ``BEGIN``
  goes through asyncpg's ``conn.transaction()``, which nests as a savepoint: the session's work
  is part of the scope's, and lasts if the scope commits.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ._errors import ConnectionReleased
from ._manager import TenantPoolManager
from ._scope import TenantConnection

__all__ = ["TenantSession", "request_session", "tenant_session"]


@asynccontextmanager
async def tenant_session(
    manager: TenantPoolManager, tenant: str | None = None, **session_kwargs: Any
) -> AsyncIterator[AsyncSession]:
    """``async with tenant_session(manager[, tenant]) as session``: an ``AsyncSession``.

    Without ``tenant`` the session uses the current scope's connection (``NoCurrentConnection``
    outside any scope); with it, the session has a scope of its own on ``tenant`` (nested in an
    open scope of the same tenant, it shares that scope's connection). ``session_kwargs`` go to
    the session (``autoflush``, ``info``, ...), except ``bind``; ``expire_on_commit`` is False
    unless given, as SQLAlchemy advises under asyncio. ``class_`` picks a subclass of
    ``AsyncSession`` (SQLModel's, say), as for ``async_sessionmaker``.
    Uncommitted work is rolled back when the block ends; the session is unusable afterwards.
    """
    async with AsyncExitStack() as stack:
        if tenant is None:
            conn = manager.current_connection()
        else:
            conn = await stack.enter_async_context(manager.with_connection(tenant))
        async with _session_on(manager, conn, **session_kwargs) as session:
            yield session


@asynccontextmanager
async def _session_on(
    manager: TenantPoolManager, conn: TenantConnection, **session_kwargs: Any
) -> AsyncIterator[AsyncSession]:
    """An ``AsyncSession`` on ``conn``, a connection of ``manager`` whose scope is open."""
    if "bind" in session_kwargs or "binds" in session_kwargs:
        raise TypeError("tenant_session binds the session to the tenant's connection itself")
    session_class: type[AsyncSession] = session_kwargs.pop("class_", AsyncSession)
    # As SQLAlchemy's asyncio documentation advises: an attribute expired by commit() would
    # need implicit IO to load again, which asyncio forbids.
    session_kwargs.setdefault("expire_on_commit", False)
    session_kwargs["sync_session_class"] = _guarded(
        session_kwargs.get("sync_session_class", session_class.sync_session_class)
    )
    lent = _LentConnection(conn, await _codecs_for(conn))
    try:
        token = _handover.set(lent)
        try:
            connection = await _engine_for(manager).connect()
        finally:
            _handover.reset(token)
        try:
            # AsyncSession finishes its close (the rollback of anything uncommitted) even when
            # cancelled meanwhile, so the scope ends after it.
            async with session_class(connection, **session_kwargs) as session:
                if conn.is_in_transaction():
                    # Per transaction, or inside the user's own: the session's transactions
                    # are savepoints in it, which must end before it does.
                    session.sync_session.info[_NESTED] = True
                try:
                    yield session
                finally:
                    session.sync_session.info[_ENDED] = conn
        finally:
            # Awaited directly, not through __aexit__'s task: with the transaction ended this
            # does no IO (NullPool's close is _LentConnection.close), so nothing can cut it short.
            await connection.close()
    finally:
        lent.end()


# -- the connection SQLAlchemy's asyncpg dialect is given ----------------------------------------

_JSON_TYPES = frozenset({"json", "jsonb"})


class _LentConnection:
    """The scope's connection as SQLAlchemy sees it, for one session.

    Everything goes to the scope's ``TenantConnection`` (so its checks apply), except what
    would end or reconfigure the connection: SQLAlchemy closes and terminates the connections
    it is done with, and sets json/jsonb codecs on each new one.
    """

    __slots__ = ("_codecs", "_conn")

    def __init__(self, conn: TenantConnection, codecs: _JsonCodecs) -> None:
        self._conn: TenantConnection | None = conn
        self._codecs = codecs
        codecs.users += 1

    def end(self) -> None:
        if self._conn is not None:
            self._conn = None
            self._codecs.users -= 1

    def _live(self) -> TenantConnection:
        conn = self._conn
        if conn is None:
            raise ConnectionReleased("this SQLAlchemy session's tenant scope has ended")
        return conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live(), name)

    def is_closed(self) -> bool:
        conn = self._conn
        return conn is None or conn.is_closed()

    async def close(self, **_: Any) -> None:
        """SQLAlchemy is done with the connection; tenantpool releases it with its scope."""

    def terminate(self) -> None:
        """As ``close``: the scope's end resets or closes the connection as its rules say."""

    async def set_type_codec(
        self, typename: str, *, schema: str = "public", format: str = "text", **_: Any
    ) -> None:
        # _JsonCodecs already serve the dialect's json and jsonb codecs; any other codec
        # would outlive the session, so it is refused rather than silently dropped.
        if schema == "pg_catalog" and typename in _JSON_TYPES and format == "binary":
            return
        raise NotImplementedError(
            f"tenantpool.sqlalchemy cannot set a codec for {schema}.{typename} on a shared"
            " connection; set it with TenantPoolManager(init=...) for every connection"
        )

    async def prepare(self, query: str, *, name: str | None = None, **kwargs: Any) -> Any:
        # A new session gets a new DBAPI connection, and with it an empty statement cache:
        # asyncpg's own cache on the server connection spares it a Parse round trip.
        return await _prepare_cached(self._live(), query, name=name, **kwargs)


_handover: ContextVar[_LentConnection | None] = ContextVar("tenantpool_sa_handover", default=None)


async def _handed_over() -> Any:
    """The engines' ``async_creator``: the connection ``session_on`` is connecting with."""
    lent = _handover.get()
    if lent is None:
        raise ConnectionReleased(
            "tenantpool's SQLAlchemy engine only connects through tenant_session()"
        )
    return lent


_engines: weakref.WeakKeyDictionary[TenantPoolManager, AsyncEngine] = weakref.WeakKeyDictionary()


def _engine_for(manager: TenantPoolManager) -> AsyncEngine:
    engine = _engines.get(manager)
    if engine is None:
        engine = _engines[manager] = create_async_engine(
            "postgresql+asyncpg://",
            async_creator=_handed_over,
            # Connections are tenantpool's: SQLAlchemy opens none and keeps none.
            poolclass=NullPool,
            # Its per-DBAPI-connection cache would start empty for every session;
            # _LentConnection.prepare uses the server connection's cache instead.
            connect_args={"prepared_statement_cache_size": 0},
        )
    return engine


# -- sessions that refuse to run after their scope -------------------------------------------

_ENDED = "tenantpool_session_ended"
_NESTED = "tenantpool_session_nested"


@functools.cache
def _guarded(base: type[Session]) -> type[Session]:
    """``base`` made to refuse any statement once its tenant scope has ended."""

    class ScopedSession(base):  # type: ignore[valid-type,misc]
        def get_bind(self, *args: Any, **kwargs: Any) -> Any:
            ended = self.info.get(_ENDED)
            if ended is not None:
                raise ConnectionReleased(
                    "this SQLAlchemy session was used after it ended (its connection:"
                    f" {ended!r}); open a new tenant_session()"
                )
            return super().get_bind(*args, **kwargs)

    ScopedSession.__name__ = ScopedSession.__qualname__ = f"Scoped{base.__name__}"
    return ScopedSession


# -- json and jsonb codecs that do not outlive the session -----------------------------------


class _JsonCodecs:
    """json/jsonb codecs of one server connection, switched by whether a session uses it.

    With ``users`` > 0 they decode to Python objects, as SQLAlchemy's dialect does (it
    serialises parameters itself and expects its codecs to parse results); otherwise they
    give the text, as asyncpg's built-in codecs do. Both take text parameters.
    """

    __slots__ = ("users",)

    def __init__(self) -> None:
        self.users = 0

    def decode_json(self, data: bytes) -> Any:
        return json.loads(data) if self.users else data.decode()

    def decode_jsonb(self, data: bytes) -> Any:
        # Binary jsonb is a version byte (1) and the text.
        return json.loads(data[1:]) if self.users else data[1:].decode()


def _encode_json(value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value.encode()


def _encode_jsonb(value: str) -> bytes:
    return b"\x01" + _encode_json(value)


_codecs: weakref.WeakKeyDictionary[asyncpg.Connection, _JsonCodecs] = weakref.WeakKeyDictionary()


async def _codecs_for(conn: TenantConnection) -> _JsonCodecs:
    """The server connection's switching codecs, installed on its first session."""
    raw = _server_connection(conn)
    codecs = _codecs.get(raw)
    if codecs is None:
        codecs = _JsonCodecs()
        for typename, encoder, decoder in (
            ("json", _encode_json, codecs.decode_json),
            ("jsonb", _encode_jsonb, codecs.decode_jsonb),
        ):
            # On the server connection, not through the scope's proxy: these codecs change
            # nothing other scopes can see, so they must not make the release close it.
            await raw.set_type_codec(
                typename, schema="pg_catalog", encoder=encoder, decoder=decoder, format="binary"
            )
        _codecs[raw] = codecs
    return codecs


# -- the two places that reach past public APIs, each tested on its own ---------------------


def _server_connection(conn: TenantConnection) -> asyncpg.Connection:
    """The asyncpg connection behind a scope's ``TenantConnection`` (which must be live)."""
    live = getattr(conn, "_live", None)
    if live is None:
        raise RuntimeError(
            "tenantpool.sqlalchemy no longer finds the connection behind TenantConnection"
        )
    raw: asyncpg.Connection = live(False)
    return raw


async def _prepare_cached(conn: TenantConnection, query: str, **kwargs: Any) -> Any:
    """``conn.prepare(query)`` through asyncpg's statement cache (its public ``prepare`` skips
    it; ``fetch`` and friends use it). Named statements are never cached."""
    if kwargs.get("name") is None:
        kwargs.pop("name", None)
        return await conn._prepare(query, use_cache=True, **kwargs)
    return await conn.prepare(query, **kwargs)


# -- FastAPI -------------------------------------------------------------------------------------

try:
    from fastapi import Depends
    from starlette.requests import Request

    from .fastapi._context import current_request, manager_for
except ImportError as _missing:  # tenant_session works without FastAPI
    _fastapi_error: ImportError | None = _missing

    def __getattr__(name: str) -> Any:
        if name in ("TenantSession", "request_session"):
            raise ImportError(
                f"tenantpool.sqlalchemy.{name} needs FastAPI: pip install 'tenantpool[fastapi]'"
            ) from _fastapi_error
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:

    async def request_session(request: Request) -> AsyncIterator[AsyncSession]:
        """The request tenant's ``AsyncSession``, on the connection ``RequestConnection`` gives.

        Closed after the response is sent: anything not committed by then is rolled back. Per
        transaction (``state_scope="transaction"``) the middleware commits the request's
        transaction as the response starts; a session still open then would have its
        uncommitted savepoint committed along, so it is closed (rolled back) just before.
        """
        # RequestConnection's body, inlined: one dependency to solve per request, not three.
        found = current_request()
        manager = manager_for(request.scope)
        conn = await found.connection(manager)
        async with _session_on(manager, conn) as session:
            sync = session.sync_session
            if sync.info.get(_NESTED):

                async def end_before_commit() -> None:
                    await session.close()
                    sync.info[_ENDED] = "closed as the response started"

                found.before_commit(end_before_commit)
            yield session

    TenantSession = Annotated[AsyncSession, Depends(request_session)]
    """The request tenant's ``AsyncSession``, closed after the response is sent (per
    transaction, as the response starts: before the request's transaction commits)."""
