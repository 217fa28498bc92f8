"""Scopes: the ContextVar that holds them, task ownership, and the connection proxy.

A scope belongs to the task that opened it. Child tasks copy the ContextVar's value when they
are created, so every lookup filters on the current task: a child never reaches its parent's
connection (concurrent use of one asyncpg connection fails, and would mix up transactions).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import asyncpg
import asyncpg.connection
import asyncpg.transaction

from ._errors import ConnectionReleased, TenantPoolError
from ._liveness import raise_if_lost

if TYPE_CHECKING:
    from ._manager import TenantPoolManager
    from ._pool import Pool, PooledConnection

__all__ = [
    "Scope",
    "TenantConnection",
    "current_scope",
    "find_scope",
    "pop_scope",
    "running_task",
    "scopes",
]


# Calls that change client-side state we cannot cheaply undo: the connection is closed at
# release instead of being handed to another scope.
_POISONING = frozenset({"set_type_codec", "reset_type_codec", "set_builtin_type_codec"})
# Calls that leave state in the server session, which a per-transaction scope must not.
_SESSION_ONLY = frozenset({"add_listener"})
# Calls that only read client-side state: they cannot dirty the session, so they do not make
# the release pay for a reset.
_INERT = frozenset(
    {
        "get_reset_query",
        "get_server_pid",
        "get_server_version",
        "get_settings",
        "is_closed",
        "is_in_transaction",
    }
)


if TYPE_CHECKING:
    _ProxyBase = asyncpg.Connection[asyncpg.Record]
else:
    # asyncpg.Connection's metaclass counts its proxies' subclasses as instances, so that
    # isinstance(conn, asyncpg.Connection) holds for ours as for asyncpg.Pool's.
    _ProxyBase = asyncpg.connection._ConnectionProxy


class TenantConnection(_ProxyBase):
    """An asyncpg connection lent to one scope; unusable once the scope has ended.

    It offers every public method of ``asyncpg.Connection``. Each call checks that the scope is
    still open, so a method reference kept past the scope cannot run a query for whichever
    tenant holds the underlying connection next.
    """

    __slots__ = ("_conn", "_raw", "_tenant", "_touched")

    def __init__(self, conn: PooledConnection, tenant: str) -> None:
        self._conn: PooledConnection | None = conn
        self._raw: asyncpg.Connection | None = conn.raw
        self._tenant = tenant
        self._touched = False

    def _live(self, touch: bool = True) -> asyncpg.Connection:
        raw = self._raw
        if raw is None:
            raise ConnectionReleased(
                f"this connection of tenant {self._tenant!r} was used after its scope ended"
            )
        if touch:
            self._touched = True
        return raw

    def _detach(self) -> tuple[PooledConnection, bool]:
        """End the proxy's life; returns the pooled connection and whether it was used."""
        conn = self._conn
        assert conn is not None
        self._conn = self._raw = None
        return conn, self._touched

    def __getattr__(self, name: str) -> Any:
        # Anything not wrapped below (attributes, private helpers) still goes through the check.
        return getattr(self._live(), name)

    # While a scope is open the raw connection names this proxy as its own (as asyncpg.Pool's
    # do), so that listener callbacks receive the proxy, never the raw connection. asyncpg then
    # drops a stale statement or type cache through ``proxy._holder._pool``: here that is
    # this one connection's cache.
    @property
    def _holder(self) -> TenantConnection:
        return self

    @property
    def _pool(self) -> TenantConnection:
        return self

    def _drop_statement_cache(self) -> None:
        self._live(False)._drop_local_statement_cache()  # type: ignore[attr-defined]

    def _drop_type_cache(self) -> None:
        self._live(False)._drop_local_type_cache()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        state = "released" if self._raw is None else f"pid={self._raw.get_server_pid()}"
        return f"<TenantConnection tenant={self._tenant!r} {state}>"


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    poisons = name in _POISONING
    session_only = name in _SESSION_ONLY
    if inspect.iscoroutinefunction(original):

        async def async_method(self: TenantConnection, *args: Any, **kwargs: Any) -> Any:
            raw = self._live()
            conn = self._conn
            if conn is not None:
                if poisons:
                    conn.close_on_release = True
                if session_only and conn.per_transaction:
                    raise TenantPoolError(
                        f"{name}() needs a session of its own (LISTEN outlives the scope's"
                        " transaction, and behind a transaction pooler notifications reach"
                        " whichever client holds the server connection); with"
                        " state_scope='transaction' listen on a connection of its own"
                    )
            try:
                return await getattr(raw, name)(*args, **kwargs)
            except Exception as exc:
                # A connection the server or the network took away raises whatever asyncpg
                # was doing at the time; the scope's user gets one retryable error for all.
                raise_if_lost(raw, self._tenant, exc)
                raise

        wrapper: Callable[..., Any] = async_method
    else:
        touches = name not in _INERT

        def method(self: TenantConnection, *args: Any, **kwargs: Any) -> Any:
            return getattr(self._live(touches), name)(*args, **kwargs)

        wrapper = method
    # __wrapped__ gives inspect.signature (editors, SQLAlchemy) asyncpg's own signature.
    functools.update_wrapper(wrapper, original)
    wrapper.__qualname__ = f"TenantConnection.{name}"
    return wrapper


for _name, _original in vars(asyncpg.Connection).items():
    if not _name.startswith("_") and inspect.isfunction(_original):
        setattr(TenantConnection, _name, _wrap(_name, _original))


class ScopeTransaction(asyncpg.transaction.Transaction):
    """asyncpg's transaction block, on a scope's connection: a connection lost under its
    ``BEGIN``, ``COMMIT`` or ``ROLLBACK`` costs ``TenantUnavailable``, as any call's does."""

    __slots__ = ("_tenant",)

    def __init__(
        self,
        connection: asyncpg.Connection,
        tenant: str,
        isolation: Any,
        readonly: bool,
        deferrable: bool,
    ) -> None:
        super().__init__(connection, isolation, readonly, deferrable)
        self._tenant = tenant

    async def _guarded(self, step: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            # Called in here: asyncpg checks the connection before the coroutine begins.
            return await step(*args)
        except Exception as exc:
            raise_if_lost(self._connection, self._tenant, exc)  # type: ignore[attr-defined]
            raise

    async def start(self) -> None:
        await self._guarded(super().start)

    async def commit(self) -> None:
        await self._guarded(super().commit)

    async def rollback(self) -> None:
        await self._guarded(super().rollback)

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._guarded(super().__aexit__, *exc_info)


def _transaction(
    self: TenantConnection,
    *,
    isolation: Any = None,
    readonly: bool = False,
    deferrable: bool = False,
) -> ScopeTransaction:
    raw = self._live()
    try:
        raw._check_open()  # type: ignore[attr-defined]
    except asyncpg.InterfaceError as exc:
        raise_if_lost(raw, self._tenant, exc)
        raise
    return ScopeTransaction(raw, self._tenant, isolation, readonly, deferrable)


functools.update_wrapper(_transaction, asyncpg.Connection.transaction)
_transaction.__qualname__ = "TenantConnection.transaction"
TenantConnection.transaction = _transaction  # type: ignore[assignment,method-assign]


class Scope:
    """One open ``with_connection`` block: who opened it, for which tenant, with what."""

    __slots__ = ("manager", "pool", "proxy", "task", "tenant")

    def __init__(
        self,
        manager: TenantPoolManager,
        tenant: str,
        pool: Pool,
        conn: PooledConnection,
        task: asyncio.Task[Any] | None,
    ) -> None:
        self.manager = manager
        self.tenant = tenant
        self.pool: Pool | None = pool
        self.task = task
        self.proxy = TenantConnection(conn, tenant)
        conn.raw._proxy = self.proxy  # type: ignore[attr-defined]

    def end(self) -> tuple[Pool, PooledConnection, bool]:
        """Close the scope: its pool, its connection, and whether the scope used it.

        Afterwards it holds neither, nor its task: copies of the ContextVar taken while it was
        open (say, by a timer asyncpg armed for a statement it cached) can outlive it by
        minutes, and must not keep a forgotten pool, a connection, or a finished task with its
        exception, traceback and frames (which reach the connection too) alive.
        """
        pool, self.pool = self.pool, None
        assert pool is not None, "a scope ends once"
        self.task = None
        conn, used = self.proxy._detach()
        conn.raw._proxy = None  # type: ignore[attr-defined]
        return pool, conn, used


# Immutable tuples, innermost last: a child task's copy can never change its parent's stack.
# An entry may outlive its scope (blocks exited out of order, a copy of the context taken
# while it was open): lookups skip ended scopes.
scopes: ContextVar[tuple[Scope, ...]] = ContextVar("tenantpool_scopes", default=())

_NOT_ASYNCIO = (
    "tenantpool needs a running asyncio task: asyncpg runs on asyncio only"
    " (not under trio, nor in a thread without an event loop)"
)


def running_task() -> asyncio.Task[Any]:
    """The asyncio task running now; ``TenantPoolError`` saying why when there is none."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread: trio, or a worker thread
        task = None
    if task is None:
        raise TenantPoolError(_NOT_ASYNCIO)
    return task


def current_scope(
    manager: TenantPoolManager, task: asyncio.Task[Any] | None = None
) -> Scope | None:
    """The innermost open scope of ``manager`` opened by ``task`` (default: the current one).

    In a thread without an event loop (FastAPI runs sync dependencies in a worker thread with a
    copy of the context) no task owns a scope: ``None``.
    """
    stack = scopes.get()
    if not stack:
        return None
    if task is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return None
    for scope in reversed(stack):
        if scope.manager is manager and scope.task is task and scope.pool is not None:
            return scope
    return None


def find_scope(manager: TenantPoolManager, tenant: str, task: asyncio.Task[Any]) -> Scope | None:
    """An open scope of ``manager`` for ``tenant`` opened by ``task``, innermost first."""
    stack = scopes.get()
    if not stack:
        return None
    for scope in reversed(stack):
        if (
            scope.manager is manager
            and scope.task is task
            and scope.tenant == tenant
            and scope.pool is not None
        ):
            return scope
    return None


def pop_scope(scope: Scope) -> None:
    """Take one entry of ``scope`` off this context's stack, wherever it is.

    Normally it is on top. Blocks exited out of order (an outer one before an inner one, by
    hand or through a misused ``AsyncExitStack``) find it lower down, or gone when exited in
    another context than entered (some frameworks do): only that entry goes. Resetting a
    ContextVar token instead would restore the stack as it was on entry, ended scopes and all.
    """
    stack = scopes.get()
    if stack and stack[-1] is scope:
        scopes.set(stack[:-1])
        return
    for i in range(len(stack) - 2, -1, -1):
        if stack[i] is scope:
            scopes.set(stack[:i] + stack[i + 1 :])
            return
