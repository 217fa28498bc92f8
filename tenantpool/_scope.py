"""Scopes: the ContextVar that holds them, task ownership, and the connection proxy.

A scope belongs to the task that opened it. Child tasks copy the ContextVar's value when they
are created, so every lookup filters on the current task: a child never reaches its parent's
connection (concurrent use of one asyncpg connection fails, and would mix up transactions).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import asyncpg

from ._errors import ConnectionReleased

if TYPE_CHECKING:
    from ._manager import TenantPoolManager
    from ._pool import Pool, PooledConnection

__all__ = ["Scope", "TenantConnection", "current_scope", "find_scope", "scopes"]


# Calls that change client-side state we cannot cheaply undo: the connection is closed at
# release instead of being handed to another scope.
_POISONING = frozenset({"set_type_codec", "reset_type_codec", "set_builtin_type_codec"})
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
    _ProxyBase = object


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

    def __repr__(self) -> str:
        state = "released" if self._raw is None else f"pid={self._raw.get_server_pid()}"
        return f"<TenantConnection tenant={self._tenant!r} {state}>"


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    poisons = name in _POISONING
    if inspect.iscoroutinefunction(original):

        async def async_method(self: TenantConnection, *args: Any, **kwargs: Any) -> Any:
            raw = self._live()
            if poisons and self._conn is not None:
                self._conn.close_on_release = True
            return await getattr(raw, name)(*args, **kwargs)

        wrapper: Callable[..., Any] = async_method
    else:
        touches = name not in _INERT

        def method(self: TenantConnection, *args: Any, **kwargs: Any) -> Any:
            return getattr(self._live(touches), name)(*args, **kwargs)

        wrapper = method
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = original.__doc__
    return wrapper


for _name, _original in vars(asyncpg.Connection).items():
    if not _name.startswith("_") and inspect.isfunction(_original):
        setattr(TenantConnection, _name, _wrap(_name, _original))


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

    def end(self) -> tuple[Pool, PooledConnection, bool]:
        """Close the scope: its pool, its connection, and whether the scope used it.

        Afterwards it holds neither: copies of the ContextVar taken while it was open (say, by
        a timer asyncpg armed for a statement it cached) can outlive it by minutes, and must
        not keep a forgotten pool or a connection alive.
        """
        pool, self.pool = self.pool, None
        assert pool is not None, "a scope ends once"
        conn, used = self.proxy._detach()
        return pool, conn, used


# Immutable tuples, innermost last: a child task's copy can never change its parent's stack.
scopes: ContextVar[tuple[Scope, ...]] = ContextVar("tenantpool_scopes", default=())


def current_scope(manager: TenantPoolManager) -> Scope | None:
    """The innermost scope of ``manager`` opened by the current task, if any."""
    stack = scopes.get()
    if not stack:
        return None
    task = asyncio.current_task()
    for scope in reversed(stack):
        if scope.manager is manager and scope.task is task:
            return scope
    return None


def find_scope(manager: TenantPoolManager, tenant: str) -> Scope | None:
    """An open scope of ``manager`` for ``tenant`` in the current task, innermost first."""
    stack = scopes.get()
    if not stack:
        return None
    task = asyncio.current_task()
    for scope in reversed(stack):
        if scope.manager is manager and scope.task is task and scope.tenant == tenant:
            return scope
    return None
