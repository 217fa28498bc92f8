"""One connection target's connections: who gets which, what is opened, reset and closed.

Every state change is a synchronous method (``_take_idle``, ``_make_idle``, ``_discard``,
``_dispatch``) that never awaits, so counts cannot be torn by a cancellation between two
updates. The I/O — opening, resetting, applying session state — runs in coroutines that call
those methods when they finish. Release is synchronous too: the reset runs in a task the pool
owns, so a caller cancelled in its ``finally`` cannot leak the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import _session
from ._errors import ManagerClosed, PoolTimeout, TenantPoolError, TenantUnavailable
from ._settings import PoolSettings, SessionState

__all__ = ["Pool", "PoolStats", "PooledConnection"]

logger = logging.getLogger("tenantpool")

Connector = Callable[[], Awaitable[asyncpg.Connection]]

# A retry hint for callers turned away; the background task's backoff will refine it.
_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool's connections and requests."""

    name: str
    size: int
    in_use: int
    idle: int
    waiting: int
    min_size: int
    max_size: int
    opening: int
    releasing: int


class PooledConnection:
    """An asyncpg connection with the metadata the pool keeps about it."""

    __slots__ = ("applied", "close_on_release", "created_at", "expires_at", "last_used", "raw")

    def __init__(self, raw: asyncpg.Connection, settings: PoolSettings) -> None:
        now = time.monotonic()
        self.raw = raw
        self.created_at = now
        self.last_used = now
        # Each connection draws its own lifetime, so a fleet opened together does not
        # reconnect together.
        self.expires_at: float | None = None
        if settings.max_age is not None:
            lifetime = settings.max_age * (1.0 - random.uniform(0.0, settings.max_age_jitter))
            self.expires_at = now + lifetime
        # The session state the connection carries; None when unknown (it must be reset).
        self.applied: SessionState | None = ()
        self.close_on_release = False


class _Waiter:
    __slots__ = ("future", "state")

    def __init__(self, future: asyncio.Future[PooledConnection | None], state: SessionState):
        self.future = future
        self.state = state


class Pool:
    """The connections of one connection identity (a DSN with its credentials)."""

    def __init__(
        self, name: str, settings: PoolSettings, connect: Connector, *, secrets: tuple[str, ...]
    ) -> None:
        self.name = name
        self.settings = settings
        self._connect = connect
        self._secrets = secrets
        # Idle connections in release order: popitem() gives the most recently used (LIFO),
        # iteration starts at the least recently used.
        self._idle: dict[PooledConnection, None] = {}
        self._idle_by_state: dict[SessionState, dict[PooledConnection, None]] = {}
        self._in_use: set[PooledConnection] = set()
        self._opening = 0
        self._releasing = 0
        self._waiters: deque[_Waiter] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._drained = asyncio.Event()
        self.last_used = time.monotonic()

    # -- figures -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Every connection of this pool, those being opened or reset included."""
        return len(self._idle) + len(self._in_use) + self._opening + self._releasing

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name,
            size=self.size,
            in_use=len(self._in_use),
            idle=len(self._idle),
            waiting=len(self._waiters),
            min_size=self.settings.min_size,
            max_size=self.settings.max_size,
            opening=self._opening,
            releasing=self._releasing,
        )

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name!r} | Requests: {len(self._in_use)} active,"
            f" {len(self._waiters)} queued | Connections: {self.size} of {self.settings.max_size}"
            f" ({len(self._idle)} idle, {self._opening} opening, {self._releasing} releasing)"
            f"{' closed' if self._closed else ''}>"
        )

    # -- checkout ----------------------------------------------------------------------------

    async def acquire(self, state: SessionState) -> PooledConnection:
        """Check out a connection carrying session ``state``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.acquire_timeout
        while True:
            conn = None if self._waiters else self._take_idle(state)
            if conn is None:
                conn = await self._acquire_slow(state, deadline)
            if conn.applied == state:
                return conn
            try:
                await _session.apply_state(
                    conn.raw, conn.applied or (), state, budget=self.settings.connect_timeout
                )
            except BaseException as exc:
                conn.applied = None
                self.release(conn, dirty=True)
                if conn.raw.is_closed() and isinstance(exc, Exception):
                    # A connection that died while idle (a server restart): try another.
                    continue
                if isinstance(exc, asyncpg.PostgresError):  # e.g. a role that does not exist
                    raise TenantPoolError(
                        f"could not apply session state on {self.name}: {self._scrub(exc)}"
                    ) from exc
                if isinstance(exc, Exception):  # timed out, or the connection broke
                    raise TenantUnavailable(
                        f"could not apply session state on {self.name}:"
                        f" {type(exc).__name__}: {self._scrub(exc)}",
                        retry_after=_RETRY_AFTER,
                    ) from exc
                raise
            conn.applied = state
            return conn

    async def _acquire_slow(self, state: SessionState, deadline: float) -> PooledConnection:
        if self._closed:
            raise ManagerClosed("the manager is closed")
        if not self._waiters and self._may_open():
            self._opening += 1
            return await self._open_for_caller(deadline)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), state)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                granted = await waiter.future
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise self._timed_out() from None
            raise
        if granted is None:  # a grant to open a connection, already counted in _opening
            return await self._open_for_caller(deadline)
        return granted

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo a wait that ended without its result being used."""
        future = waiter.future
        if future.done() and not future.cancelled():
            granted = future.result()
            if granted is None:
                self._opening -= 1
            else:
                self._in_use.discard(granted)
                self._make_idle(granted)
            self._dispatch()
        else:
            future.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _timed_out(self) -> PoolTimeout:
        return PoolTimeout(
            f"couldn't get a connection from {self.name} after"
            f" {self.settings.acquire_timeout:.2f} sec",
            retry_after=_RETRY_AFTER,
        )

    def _may_open(self) -> bool:
        # Open rather than wait for a connection whose reset is in flight: a sequential caller
        # then overlaps its next query with the previous reset instead of waiting it out
        # (165 us vs 446 us a checkout in benchmarks/checkout.py). The cap will gate this.
        return self.size < self.settings.max_size

    async def _open_for_caller(self, deadline: float) -> PooledConnection:
        task = asyncio.get_running_loop().create_task(self._open())
        self._track(task)
        try:
            async with asyncio.timeout_at(deadline):
                # Shielded: a caller that gives up leaves the connect running, and the pool
                # keeps what it opens instead of leaking a half-open connection.
                conn = await asyncio.shield(task)
        except BaseException as exc:
            if task.done():
                self._adopt(task)
            else:
                task.add_done_callback(self._adopt)
            if isinstance(exc, TimeoutError):
                raise self._timed_out() from None
            raise
        self._opening -= 1
        self._in_use.add(conn)
        return conn

    def _adopt(self, task: asyncio.Task[PooledConnection]) -> None:
        """Keep a connection whose opener gave up waiting for it."""
        if not task.cancelled() and task.exception() is None:
            self._opening -= 1
            self._make_idle(task.result())
            self._dispatch()

    async def _open(self) -> PooledConnection:
        """Open a connection; it stays counted in ``_opening`` until its opener claims it."""
        try:
            raw = await self._connect()
        except BaseException as exc:
            self._opening -= 1
            self._dispatch()
            if self._closed:
                # close() cancels this task: the caller must see why, not a stray cancellation.
                raise ManagerClosed("the manager is closed") from None
            if isinstance(exc, Exception):
                raise TenantUnavailable(
                    f"cannot connect to {self.name}: {type(exc).__name__}: {self._scrub(exc)}",
                    retry_after=_RETRY_AFTER,
                ) from exc
            raise
        if self._closed:
            self._opening -= 1
            raw.terminate()
            raise ManagerClosed("the manager is closed")
        return PooledConnection(raw, self.settings)

    def _take_idle(self, state: SessionState | None) -> PooledConnection | None:
        """Pop an idle connection, one already carrying ``state`` first, most recent first."""
        while self._idle:
            bucket = self._idle_by_state.get(state) if state is not None else None
            if bucket:
                conn = bucket.popitem()[0]
                del self._idle[conn]
            else:
                conn = self._idle.popitem()[0]
                self._unindex(conn)
            if conn.raw.is_closed():
                logger.info("tenantpool: dropped a dead idle connection of %s", self.name)
                self._discard(conn)
                continue
            self._in_use.add(conn)
            self.last_used = time.monotonic()
            return conn
        return None

    def _unindex(self, conn: PooledConnection) -> None:
        state = conn.applied
        assert state is not None, "idle connections always carry a known state"
        bucket = self._idle_by_state[state]
        del bucket[conn]
        if not bucket:
            del self._idle_by_state[state]

    # -- release -----------------------------------------------------------------------------

    def release(self, conn: PooledConnection, *, dirty: bool) -> None:
        """Give a connection back; synchronous so that no cancellation can interrupt it.

        ``dirty`` says user code may have touched the session: it is then reset in the
        background and is not handed to anyone until that is done.
        """
        self._in_use.discard(conn)
        now = time.monotonic()
        conn.last_used = self.last_used = now
        raw = conn.raw
        if self._closed or conn.close_on_release or raw.is_closed():
            self._discard(conn)
        elif dirty:
            _session.forget_client_state(raw)
            self._releasing += 1
            self._track(asyncio.get_running_loop().create_task(self._reset(conn)))
            return
        else:
            self._make_idle(conn)
        self._dispatch()

    async def _reset(self, conn: PooledConnection) -> None:
        raw = conn.raw
        timeout = self.settings.connect_timeout
        ok = False
        try:
            await _session.settle(raw, budget=timeout)
            for deallocate in (False, True):
                script = _session.reset_script(
                    conn.applied, in_transaction=raw.is_in_transaction(), deallocate=deallocate
                )
                try:
                    await raw.execute(script, timeout=timeout)
                    break
                except _session.PreparedStatementsLeft:
                    if deallocate:
                        raise
            if conn.applied is None:
                conn.applied = ()
            ok = True
        except (Exception, asyncio.CancelledError) as exc:
            # A connection whose state is unknown is never reused.
            logger.info(
                "tenantpool: closing a connection of %s that could not be reset: %s",
                self.name,
                self._scrub(exc) or type(exc).__name__,
            )
        finally:
            self._releasing -= 1
            if ok and not self._closed:
                self._make_idle(conn)
            else:
                self._discard(conn)
            self._dispatch()

    def _make_idle(self, conn: PooledConnection) -> None:
        if self._closed:
            self._discard(conn)
            return
        state = conn.applied
        if state is None:  # state unknown: never idle without a reset
            self._discard(conn)
            return
        self._idle[conn] = None
        self._idle_by_state.setdefault(state, {})[conn] = None

    def _discard(self, conn: PooledConnection) -> None:
        """Forget a connection that is in none of the pool's collections, closing it."""
        conn.raw.terminate()
        if self._closed and not self._in_use and not self._releasing:
            self._drained.set()

    def _dispatch(self) -> None:
        """Serve queued requests, first come first served, with whatever is free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            if waiter.future.done():
                waiters.popleft()
                continue
            conn = self._take_idle(waiter.state)
            if conn is not None:
                waiters.popleft()
                waiter.future.set_result(conn)
            elif self._may_open():
                waiters.popleft()
                self._opening += 1
                waiter.future.set_result(None)
            else:
                break

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Close every connection; checked-out ones get ``grace`` seconds, then are terminated."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(ManagerClosed("the manager is closed"))
        idle = list(self._idle)
        self._idle.clear()
        self._idle_by_state.clear()
        await asyncio.gather(*(self._close_gracefully(c.raw, grace) for c in idle))
        if self._in_use or self._releasing:
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                logger.warning(
                    "tenantpool: terminating %d connection(s) of %s still checked out at close",
                    len(self._in_use),
                    self.name,
                )
        for conn in list(self._in_use):
            conn.raw.terminate()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _close_gracefully(self, raw: asyncpg.Connection, grace: float) -> None:
        try:
            await raw.close(timeout=grace)
        except Exception:
            raw.terminate()
