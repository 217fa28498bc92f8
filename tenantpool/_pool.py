"""One connection target's connections: who gets which, what is opened, reset and closed.

Who gets which connection is decided by the pool's ``Dispatch``, a pure state machine (see
``_dispatch``); this module is its I/O side. Every state change is a synchronous method
(``_take_idle``, ``_make_idle``, ``_discard``, ``_serve_waiters``, ``_slot_freed``) that never
awaits, so counts cannot be torn by a cancellation between two updates. The I/O — opening,
resetting, pinging, closing — runs in tasks the pool owns, which call those methods when they
finish. Release is synchronous too, so a caller cancelled in its ``finally`` cannot leak the
connection.

The pools of one manager share a ``Capacity`` (the cap across pools), a ``Deadlines`` (when
queued checkouts give up), a ``Counters`` and the supervisor that spawns their tasks. A pool
asks the capacity for a slot before it opens a connection, tells it when a connection becomes
idle or stops being so, and when one is gone; the capacity's decisions (grant a slot to a queued
request, steal an idle connection for one) are carried out by ``carry_out`` on whichever pool
they name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg

from . import _session
from ._backoff import Admission, Backoff
from ._capacity import Capacity, Grant, Steal
from ._deadlines import Deadlines
from ._dispatch import Dispatch
from ._errors import ManagerClosed, PoolTimeout, TenantPoolError, TenantUnavailable
from ._settings import PoolSettings, SessionState
from ._stats import Counters, PoolStats

__all__ = [
    "InitFailed",
    "Pool",
    "PooledConnection",
    "SharedCapacity",
    "SharedDeadlines",
    "carry_out",
    "time_out",
]

logger = logging.getLogger("tenantpool")

Connector = Callable[[], Awaitable[asyncpg.Connection]]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]

# A queued checkout that times out learns nothing about when capacity frees up; one second is
# a polite pause that does not turn a brief overload into a long outage.
_TIMEOUT_RETRY_AFTER = 1.0

# While a pool has connections out, at most this many are opened (or queued for at the cap) at
# once for its waiters: a pool of 5 hit by a burst of short requests ends at about 7, not at
# max_size (what comes back serves the burst), and one whose load stays keeps growing, two
# connects at a time. A pool with nothing out opens for every waiter at once.
_GROWTH_STEP = 2


class InitFailed(Exception):
    """The manager's ``init`` raised (or ran past ``connect_timeout``) on a new connection:
    a fault of the application's callback, not of the server, so no backoff follows."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(cause)
        self.cause = cause


class PooledConnection:
    """An asyncpg connection with the metadata the pool keeps about it."""

    __slots__ = (
        "applied",
        "close_on_release",
        "created_at",
        "cut_off",
        "expires_at",
        "generation",
        "guards",
        "last_checked",
        "last_used",
        "next_state",
        "per_transaction",
        "raw",
    )

    def __init__(
        self, raw: asyncpg.Connection, settings: PoolSettings, draw: float, generation: int = 0
    ) -> None:
        now = time.monotonic()
        self.raw = raw
        # The pool's generation when the connect began: expire() retires older ones.
        self.generation = generation
        # Its scopes are transactions (state_scope="transaction"): no session state allowed.
        self.per_transaction = settings.state_scope == "transaction"
        self.created_at = now
        self.last_used = now
        self.last_checked = now
        # Each connection draws its own lifetime from [max_age * (1 - jitter), max_age], so a
        # fleet opened together does not reconnect together.
        self.expires_at: float | None = None
        if settings.max_age is not None:
            self.expires_at = now + settings.max_age * (1.0 - draw * settings.max_age_jitter)
        # The session state the connection carries; None when unknown (it must be reset).
        self.applied: SessionState | None = ()
        self.close_on_release = False
        self.cut_off = False  # terminated by the watchdog: its slot is held a while
        # The reset's guards prepared on it, by number of settings (see _session.GUARD).
        self.guards: tuple[int, ...] = ()
        self.next_state: SessionState | None = None  # for the reset: whom to prepare it for


class _Waiter:
    """A checkout waiting for a connection of its pool (or, queued, for a slot under the cap)."""

    __slots__ = ("future", "pool", "since", "waiting")

    def __init__(self, pool: Pool) -> None:
        loop = asyncio.get_running_loop()
        # The result is a connection handed over: idle, back from its reset, or just opened.
        self.future: asyncio.Future[PooledConnection] = loop.create_future()
        self.pool = pool
        self.since = loop.time()
        self.waiting = True  # until served, failed or cancelled (the pool forgets it)


def _still_waiting(waiter: _Waiter) -> bool:
    # A cancelled checkout's future is done before its task runs again to say it left.
    return not waiter.future.done()


def _usable(conn: PooledConnection) -> bool:
    return not conn.raw.is_closed()


SharedCapacity = Capacity["Pool", PooledConnection, _Waiter]
SharedDeadlines = Deadlines[_Waiter]


def time_out(waiter: _Waiter) -> None:
    """A queued checkout reached its deadline (``SharedDeadlines`` calls this)."""
    waiter.pool._time_out(waiter)


def carry_out(
    capacity: SharedCapacity,
    decision: Grant[_Waiter] | Steal[Pool, PooledConnection, _Waiter] | None,
) -> None:
    """Act on a capacity decision: the chosen checkout's pool opens a connection, after a
    steal's close; whoever of that pool waits first when it is ready gets it."""
    while decision is not None:
        waiter = decision.request
        if not waiter.future.done():
            victim = None
            if isinstance(decision, Steal):
                victim = decision.conn
                decision.pool._evict(victim)
                waiter.pool._counters.steals += 1
            waiter.pool._granted(waiter, victim)
            return
        # Chosen in the instant between its cancellation and its clean-up: pass it on.
        waiter.pool._leave(waiter)
        if isinstance(decision, Steal):
            decision = capacity.became_idle(decision.conn, decision.pool)
        else:
            decision = capacity.closed()


class Pool:
    """The connections of one connection identity (a DSN with its credentials)."""

    # Slots: a service may hold a pool for every tenant seen lately, most of them idle.
    __slots__ = (
        "__weakref__",
        "_backoff",
        "_capacity",
        "_closed",
        "_closers",
        "_connect",
        "_counters",
        "_deadlines",
        "_dispatch",
        "_drained",
        "_generation",
        "_held",
        "_last_error",
        "_lifetime_draw",
        "_on_back",
        "_opens",
        "_refill_spread",
        "_refill_timer",
        "_secrets",
        "_serve_again",
        "_serving",
        "_spawn",
        "_tasks",
        "checkouts",
        "last_used",
        "name",
        "per_transaction",
        "server",
        "settings",
    )

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        connect: Connector,
        *,
        secrets: tuple[str, ...],
        capacity: SharedCapacity,
        deadlines: SharedDeadlines,
        counters: Counters,
        spawn: Spawn,
        backoff: Backoff,
        lifetime_draw: Callable[[], float],
        server: str = "",
        on_back: Callable[[Pool], None] | None = None,
        refill_spread: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.server = server  # where it connects: pools of one server hear of its return
        self._on_back = on_back
        self._refill_spread = refill_spread
        self.settings = settings
        self.per_transaction = settings.state_scope == "transaction"
        self._connect = connect
        self._secrets = secrets
        self._capacity = capacity
        self._counters = counters
        self._backoff = backoff
        self._lifetime_draw = lifetime_draw
        self._last_error = ""
        self._dispatch: Dispatch[PooledConnection, _Waiter] = Dispatch(
            settings.max_size,
            counters,
            usable=_usable,
            waiting=_still_waiting,
            growth_step=_GROWTH_STEP,
        )
        # Opens in flight, with when they began (for the watchdog).
        self._opens: dict[asyncio.Task[None], float] = {}
        # Slots of connections cut off, held until these timers fire (see _hold_slot).
        self._held: deque[asyncio.TimerHandle] = deque()
        self._serving = False
        self._serve_again = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()  # among _tasks: closes in flight
        self._closed = False
        self._drained: asyncio.Event | None = None  # made by close(), to wait on
        # A refill put off: while the backoff holds the next attempt back, or spread out.
        self._refill_timer: asyncio.TimerHandle | None = None
        # When waiters give up: the manager's, shared by its pools (one timer in all).
        self._deadlines = deadlines
        self._spawn = spawn  # the manager's supervisor starts (and close() awaits) its tasks
        self._generation = 0  # bumped by expire()
        self.checkouts = 0
        self.last_used = time.monotonic()

    # -- figures -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Every connection of this pool: in use, idle, opening, being reset or closed."""
        return self._dispatch.size

    @property
    def backing_off(self) -> bool:
        return self._backoff.backing_off

    def stats(self) -> PoolStats:
        dispatch = self._dispatch
        return PoolStats(
            name=self.name,
            size=dispatch.size,
            in_use=len(dispatch.in_use),
            idle=len(dispatch.idle),
            waiting=len(dispatch.waiters),
            min_size=self.settings.min_size,
            max_size=self.settings.max_size,
            opening=dispatch.opening,
            releasing=len(dispatch.aside),
            closing=dispatch.closing,
            checkouts=self.checkouts,
            backing_off=self._backoff.backing_off,
            retry_after=self._backoff.retry_after(time.monotonic()),
        )

    def __repr__(self) -> str:
        state = " closed" if self._closed else " backing off" if self.backing_off else ""
        d = self._dispatch
        return (
            f"<Pool {self.name!r} | Requests: {len(d.in_use)} active,"
            f" {len(d.waiters)} queued | Connections: {d.size} of {self.settings.max_size}"
            f" ({len(d.idle)} idle, {d.opening} opening, {len(d.aside)} releasing,"
            f" {d.closing} closing){state}>"
        )

    # -- checkout ----------------------------------------------------------------------------

    async def acquire(
        self, state: SessionState, *, tenant: str = "", started: float | None = None
    ) -> PooledConnection:
        """Check out a connection carrying session ``state``.

        Per transaction, the connection comes with its transaction open and ``state`` set in
        it; idle connections then carry no state at all, so any of them will do. ``started``
        is the loop time the checkout began waiting, if it already did (for its quota): the
        ``acquire_timeout`` counts from then.
        """
        per_transaction = self.per_transaction
        wanted: SessionState = () if per_transaction else state
        deadline = 0.0 if started is None else started + self.settings.acquire_timeout
        while True:
            conn = None if self._dispatch.waiters else self._take_idle(wanted)
            if conn is None:
                if started is None:
                    started = asyncio.get_running_loop().time()
                    deadline = started + self.settings.acquire_timeout
                conn = await self._acquire_slow(wanted, deadline, tenant)
            if per_transaction or conn.applied != state:
                try:
                    if per_transaction:
                        await _session.begin(conn.raw, state, budget=self.settings.connect_timeout)
                    else:
                        await _session.apply_state(
                            conn.raw,
                            conn.applied or (),
                            state,
                            budget=self.settings.connect_timeout,
                        )
                except BaseException as exc:
                    conn.applied = None
                    self.release(conn, dirty=True)
                    if not isinstance(exc, Exception):
                        raise
                    if conn.raw.is_closed():
                        # A connection that died while idle (a server restart): try another.
                        continue
                    raise self._apply_failed(exc) from exc
                conn.applied = wanted
            self.checkouts += 1
            self._counters.checkouts += 1
            if started is not None:
                self._counters.waited(asyncio.get_running_loop().time() - started)
            return conn

    def _apply_failed(self, exc: Exception) -> TenantPoolError:
        if isinstance(exc, asyncpg.PostgresError):  # e.g. a role that does not exist
            return TenantPoolError(
                f"could not apply session state on {self.name}: {self._scrub(exc)}"
            )
        # Timed out, or the connection broke.
        return TenantUnavailable(
            f"could not apply session state on {self.name}:"
            f" {type(exc).__name__}: {self._scrub(exc)}",
            retry_after=_TIMEOUT_RETRY_AFTER,
        )

    async def _acquire_slow(
        self, state: SessionState, deadline: float, tenant: str
    ) -> PooledConnection:
        if self._closed:
            raise ManagerClosed("the manager is closed")
        retry_after = self._rejecting()
        if retry_after is not None:
            raise self._unavailable(retry_after)
        waiter = _Waiter(self)
        self._dispatch.wait(waiter, tenant, state)
        self._deadlines.add(deadline, waiter)
        self._serve_waiters()
        try:
            # Its deadline is kept by the manager's Deadlines, which fails it with PoolTimeout.
            return await waiter.future
        except BaseException:
            self._abandon(waiter)
            # A failed task keeps this frame in its traceback: not the connection handed over.
            del waiter
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo a wait that ended without its result being used."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            conn = future.result()
            self._dispatch.give_back(conn)
            self._make_idle(conn)
            return
        future.cancel()
        if waiter.waiting:
            self._leave(waiter)
            self._serve_waiters()

    def _time_out(self, waiter: _Waiter) -> None:
        self._leave(waiter)
        waiter.future.set_exception(self._timed_out())
        # A waiter gone from the capacity's queue can let one behind it proceed.
        self._serve_waiters()

    def _timed_out(self) -> PoolTimeout:
        self._counters.timeouts += 1
        return PoolTimeout(
            f"couldn't get a connection from {self.name} after"
            f" {self.settings.acquire_timeout:.2f} sec",
            retry_after=_TIMEOUT_RETRY_AFTER,
        )

    def _rejecting(self) -> float | None:
        """While the target backs off and no probe may run yet: the wait left, else None."""
        backoff = self._backoff
        if not backoff.backing_off:
            return None
        wait = backoff.retry_after(time.monotonic())
        return wait if backoff.probing or wait > 0 else None

    def _unavailable(self, retry_after: float) -> TenantUnavailable:
        return TenantUnavailable(
            f"cannot connect to {self.name} ({self._last_error}); next attempt in"
            f" {retry_after:.2f} s",
            retry_after=retry_after,
        )

    def _granted(self, waiter: _Waiter, victim: PooledConnection | None) -> None:
        """A slot was granted for ``waiter``: open a connection in it (after closing a stolen
        ``victim``). The waiter keeps its place; the connection, once open, goes to whoever
        waits first then, so a checkout never waits out a slow connect while connections
        of its pool come back."""
        self._dispatch.granted(waiter)
        self._grow(victim)

    def _grow(self, victim: PooledConnection | None = None) -> None:
        """Open a connection in a slot already taken (counted as opening), and file it as free
        once open."""
        # Admitted now, not when the task runs: while a probe is in flight, later checkouts
        # are turned away at once instead of each starting an open the backoff then refuses.
        admission = self._backoff.admit(time.monotonic())
        task = self._spawn(self._open(victim, admission))
        self._track(task)
        self._opens[task] = time.monotonic()
        task.add_done_callback(self._opens.pop)

    async def _open(self, victim: PooledConnection | None, admission: Admission) -> None:
        """Open a connection in a slot counted as opening; file it as free once open.

        A stolen ``victim`` is closed first, so the server never sees more than the cap. A
        failure frees the slot; a failed connect fails the pool's waiters (the backoff's).
        """
        generation = self._generation
        raw: asyncpg.Connection | None = None
        try:
            if victim is not None and not await _close_gracefully(
                victim.raw, self.settings.connect_timeout
            ):
                # Cut off: its backend may outlive it a while (see _hold_slot).
                await asyncio.sleep(self.settings.connect_timeout)
            if not self._closed and admission is not Admission.REJECT:
                try:
                    raw = await self._connect()
                except InitFailed as exc:
                    self._reached()  # the server answered; init is the application's
                    self._init_failed(exc.cause)
                except Exception as exc:
                    self._connect_failed(exc)
                    admission = Admission.REJECT  # reported: nothing left to abandon
                else:
                    self._reached()
        except BaseException:
            self._gave_up(admission)
            raise
        if raw is None or self._closed:
            if raw is not None:
                raw.terminate()
            self._gave_up(admission)
            return
        if admission is Admission.PROBE:
            self._cancel_refill_timer()
            # The target is back: the rest of min_size need not wait for the next tick.
            self.refill()
            if self._on_back is not None:
                self._on_back(self)
        self._dispatch.opened()
        self._make_idle(PooledConnection(raw, self.settings, self._lifetime_draw(), generation))

    def _reached(self) -> None:
        """A connect got through: the target is up, for every caller."""
        self._backoff.succeeded()
        self._counters.failing.pop(self.name, None)

    def _gave_up(self, admission: Admission) -> None:
        """An open ended without a connection: its slot goes back."""
        self._dispatch.opened()
        if admission is Admission.PROBE and self._backoff.probing:
            self._backoff.probe_abandoned()  # cut short before it knew (cancelled, closed)
        self._slot_freed()
        self._refill_when_allowed()

    def _init_failed(self, cause: Exception) -> None:
        """Report an ``init`` failure to the checkout whose turn it is (the others' turns
        open again): a bug in a callback is an error to show, not an outage to wait out."""
        text = self._scrub(cause) or "no message"
        error = TenantPoolError(
            f"the init callback failed on a new connection of {self.name}:"
            f" {type(cause).__name__}: {text}"
        )
        logger.error("tenantpool: %s", error)
        for waiter in self._dispatch.fair_order(1):
            self._leave(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _connect_failed(self, exc: Exception) -> None:
        self._counters.connect_errors += 1
        self._last_error = f"{type(exc).__name__}: {self._scrub(exc)}"
        failures = self._backoff.failures
        delay = self._backoff.failed(time.monotonic())
        self._counters.failing[self.name] = None
        if self._backoff.failures != failures:
            logger.warning(
                "tenantpool: cannot connect to %s (%s); attempt %d, next in %.2f s",
                self.name,
                self._last_error,
                self._backoff.failures,
                delay,
            )
        # Fail fast whoever queues behind a target that is down, rather than each waiting out
        # acquire_timeout.
        for waiter, queued in self._dispatch.leave_all():
            self._left(waiter, queued)
            if not waiter.future.done():
                waiter.future.set_exception(self._unavailable(delay))

    def _take_idle(self, state: SessionState | None) -> PooledConnection | None:
        """Check out an idle connection, one already carrying ``state`` first."""
        conn = self._dispatch.take(state)
        if self._dispatch.dead:
            self._bury()
        if conn is not None:
            self._capacity.not_idle(conn)
            self.last_used = time.monotonic()
        return conn

    def _bury(self) -> None:
        """Close the idle connections the dispatch found dead (a server restart)."""
        dead, self._dispatch.dead = self._dispatch.dead, []
        for conn in dead:
            self._capacity.not_idle(conn)
            logger.info("tenantpool: dropped a dead idle connection of %s", self.name)
            self._discard(conn)

    def _evict(self, conn: PooledConnection) -> None:
        """Take an idle connection out of the pool (the capacity has already forgotten it)."""
        self._dispatch.remove_idle(conn)

    def _remove_idle(self, conn: PooledConnection) -> None:
        self._dispatch.remove_idle(conn)
        self._capacity.not_idle(conn)

    # -- release -----------------------------------------------------------------------------

    def release(self, conn: PooledConnection, *, dirty: bool) -> None:
        """Give a connection back; synchronous so that no cancellation can interrupt it.

        ``dirty`` says user code may have touched the session: it is then reset in the
        background and is not handed to anyone until that is done.
        """
        self._dispatch.give_back(conn)
        now = time.monotonic()
        conn.last_used = self.last_used = now
        raw = conn.raw
        if (
            self._closed
            or conn.close_on_release
            or conn.generation != self._generation
            or raw.is_closed()
        ):
            self._discard(conn)
        elif conn.expires_at is not None and now >= conn.expires_at:
            self._counters.recycles += 1
            self._discard(conn)
        elif dirty:
            _session.forget_client_state(raw)
            # Reset it straight to the state of the waiter it will likely serve, sparing that
            # checkout the round trip of a tenant switch.
            conn.next_state = self._dispatch.next_state()
            self._set_aside(conn, self._reset)
        else:
            self._make_idle(conn)

    async def commit(self, conn: PooledConnection) -> None:
        """End a per-transaction scope that used its connection and raised nothing.

        The commit is the caller's to wait for: its error (a deferred constraint, a
        serialization failure) is the scope's. The connection comes back whatever happens,
        a cancellation included; after a failure, through the rollback of a reset.
        """
        raw = conn.raw
        committed = False
        try:
            self._check_scope_transaction(raw)
            await raw.execute("COMMIT")
            committed = True
        finally:
            if committed:
                _session.forget_client_state(raw)
            self.release(conn, dirty=not committed)

    async def commit_and_begin(self, conn: PooledConnection, state: SessionState) -> None:
        """Commit a per-transaction scope's work so far and open its next transaction."""
        raw = conn.raw
        self._check_scope_transaction(raw)
        # One round trip: a failed COMMIT stops the script before the BEGIN.
        await raw.execute("COMMIT; " + _session.begin_script(state))

    def _check_scope_transaction(self, raw: asyncpg.Connection) -> None:
        if not raw.is_in_transaction():
            raise TenantPoolError(
                f"the scope's transaction on {self.name} was ended inside the scope"
                " (a COMMIT or ROLLBACK in user code): with state_scope='transaction',"
                " statements after it ran without the tenant's state; use"
                " conn.transaction() for a nested transaction (a savepoint)"
            )

    async def _reset(self, conn: PooledConnection) -> None:
        raw = conn.raw
        await _session.settle(raw, budget=self.settings.connect_timeout)
        if self.per_transaction:
            # The scope's transaction is all tenantpool set, so its rollback is the whole
            # reset; a session-wide clean-up would run, behind a transaction pooler, on
            # whichever server connection the pooler picks, another client's perhaps.
            if raw.is_in_transaction():
                await raw.execute("ROLLBACK")
            conn.applied = ()
            return
        wanted, conn.next_state = conn.next_state, None
        if wanted is not None and wanted != conn.applied:
            try:
                await self._clean(conn, wanted)
            except asyncpg.PostgresError:
                pass  # say, the waiter's role is gone: its own checkout reports that
            else:
                conn.applied = wanted
                return
        await self._clean(conn, conn.applied or ())
        conn.applied = conn.applied or ()

    async def _clean(self, conn: PooledConnection, state: SessionState) -> None:
        """One round trip (two if user code left SQL prepared statements): clean, ``state`` set."""
        raw = conn.raw
        baseline = _session.baseline_of(raw)
        size = len(baseline) + len(state)
        ready = size in conn.guards
        if not ready:
            # A guard prepared afresh cannot tell whether user code wiped the connection's
            # statements (DEALLOCATE ALL, DISCARD ALL) since the last reset; asyncpg's cached
            # ones may be gone, so it prepares them again. Later wipes take the guard along,
            # and that reset fails instead.
            _session.drop_statement_caches(raw)
        for deallocate in (False, True):
            script = _session.reset_script(
                state,
                in_transaction=raw.is_in_transaction(),
                guard_ready=ready,
                deallocate=deallocate,
                baseline=baseline,
            )
            try:
                # No timeout here: a timer per release costs more than the query's own client
                # work. A reset that hangs is cut off by the watchdog instead.
                await raw.execute(script)
                break
            except _session.PreparedStatementsLeft:
                if deallocate:
                    raise
        if deallocate:
            conn.guards = (size,)  # the others went with the user's statements
        elif not ready:
            conn.guards = (*conn.guards, size)
        _session.use_statement_cache(raw, state)

    async def _ping(self, conn: PooledConnection) -> None:
        await conn.raw.execute("SELECT 1")  # bounded by the watchdog, as resets are

    def _set_aside(
        self, conn: PooledConnection, work: Callable[[PooledConnection], Awaitable[None]]
    ) -> None:
        """Run ``work`` (a reset or a ping) on a connection nobody can have meanwhile."""
        self._dispatch.set_aside(conn, time.monotonic())
        # The pool's own task, not the supervisor's: every dirty release starts one, and done
        # callbacks keeping two sets of books made its life half as dear again. It takes
        # itself off the pool's books as it ends (see _tend); the manager's close() still
        # awaits it, through the pool's close() (a pool with a task running is never forgotten).
        self._tasks.add(asyncio.get_running_loop().create_task(self._tend(conn, work)))

    async def _tend(
        self, conn: PooledConnection, work: Callable[[PooledConnection], Awaitable[None]]
    ) -> None:
        ok = False
        try:
            await work(conn)
            ok = True
        except (Exception, asyncio.CancelledError) as exc:
            # A connection whose state is unknown, or that failed its ping, is never reused.
            logger.info(
                "tenantpool: closing a connection of %s after a failed %s: %s",
                self.name,
                work.__name__.lstrip("_"),
                self._scrub(exc) or type(exc).__name__,
            )
        finally:
            self._dispatch.back(conn)
            conn.last_checked = time.monotonic()
            self._tasks.discard(asyncio.current_task())
            if ok:
                self._make_idle(conn)
            else:
                self._discard(conn)

    def _make_idle(self, conn: PooledConnection) -> None:
        """File a free connection: to this pool's first waiter, else idle (maybe stolen)."""
        # State unknown: never idle without a reset. Older than expire(): replaced.
        if self._closed or conn.applied is None or conn.generation != self._generation:
            self._discard(conn)
            return
        self._dispatch.file_idle(conn, conn.applied)
        if self._dispatch.waiters:
            passed = self._capacity.pass_on(conn, self)
            if passed is not None:  # over its fair share at the cap: another tenant's turn
                carry_out(self._capacity, passed)
                self._serve_waiters()  # its waiters counted on this one: they ask for a slot
                return
            self._serve_waiters()
            if conn not in self._dispatch.idle:
                return
        carry_out(self._capacity, self._capacity.became_idle(conn, self))

    def _discard(self, conn: PooledConnection) -> None:
        """Close a connection that is in none of the pool's collections.

        Its slot under the cap is freed only once the server has let it go, so that the
        server never sees more connections than the cap.
        """
        if conn.raw.is_closed():
            if conn.cut_off:
                self._dispatch.closing_started()
                self._hold_slot()
            else:
                self._slot_freed()
            return
        self._dispatch.closing_started()
        task = self._spawn(self._close(conn.raw))
        self._track(task)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)
        if self._dispatch.waiters:
            self._serve_waiters()  # a waiter may have counted on it coming back

    async def _close(self, raw: asyncpg.Connection) -> None:
        polite = False
        try:
            polite = await _close_gracefully(raw, self.settings.connect_timeout)
        finally:
            if polite:
                self._dispatch.closing_done()
                self._slot_freed()
            else:
                self._hold_slot()

    def _hold_slot(self) -> None:
        """Keep the slot of a connection cut off (terminated, not closed politely), counted
        as closing, for ``connect_timeout``: its backend may live on until it notices
        (a query still running, a server slow to answer), and the server must never see more
        connections than the cap. Bounded, since tenantpool cannot watch the backend go."""
        if self._closed:
            self._dispatch.closing_done()
            self._slot_freed()
            return
        loop = asyncio.get_running_loop()
        self._held.append(loop.call_later(self.settings.connect_timeout, self._slot_released))

    def _slot_released(self) -> None:
        self._held.popleft().cancel()  # timers of one delay fire in order: this one
        self._dispatch.closing_done()
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection (or an attempt at one) is gone: its slot goes to whoever waits first."""
        carry_out(self._capacity, self._capacity.closed())
        self._serve_waiters()
        if self._drained is not None and not self._dispatch.in_use and not self._dispatch.aside:
            self._drained.set()

    def _leave(self, waiter: _Waiter) -> None:
        """Forget a waiter that stops waiting unserved (failed, timed out, cancelled)."""
        queued = self._dispatch.leave(waiter)
        if queued is not None:
            self._left(waiter, queued)

    def _left(self, waiter: _Waiter, queued: bool) -> None:
        """The dispatch forgot ``waiter`` (served or not): so do the deadlines and the cap."""
        waiter.waiting = False
        self._deadlines.left()
        if queued:
            self._capacity.withdraw(waiter)

    def _serve_waiters(self) -> None:
        """Carry out the dispatch's decisions until it has none left."""
        # Carrying them out can free or take capacity and call back in here; the outer call
        # then simply goes round again.
        if self._serving:
            self._serve_again = True
            return
        self._serving = True
        try:
            self._serve_again = True
            while self._serve_again:
                self._serve_again = False
                self._serve_once()
        finally:
            self._serving = False

    def _serve_once(self) -> None:
        plan = self._dispatch.assign()
        if self._dispatch.dead:
            self._bury()
        for waiter, queued in plan.gone:
            self._left(waiter, queued)
        if plan.serve:
            self.last_used = time.monotonic()
            for serve in plan.serve:
                self._left(serve.waiter, serve.queued)
                self._capacity.not_idle(serve.conn)
                serve.waiter.future.set_result(serve.conn)
        for waiter in plan.ask:
            retry_after = self._rejecting()
            if retry_after is not None:
                self._leave(waiter)
                waiter.future.set_exception(self._unavailable(retry_after))
                self._serve_again = True  # the next in line fails fast too
                continue
            decision = self._capacity.request(waiter, self)
            if decision is None:
                self._dispatch.queued_at_cap(waiter)
            else:
                carry_out(self._capacity, decision)
        if plan.spare and self._rejecting() is None and self._capacity.take():
            self._dispatch.granted()
            self._grow()

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- upkeep (the background task's duties) -----------------------------------------------

    @property
    def needs_upkeep(self) -> bool:
        """Whether any duty has something to do: they look at idle and set-aside connections,
        but refill. Lets a sweep over many thousands of empty pools stay cheap."""
        return (
            bool(self._dispatch.idle)
            or bool(self._dispatch.aside)
            or bool(self._opens)
            or self.size < self.settings.min_size
        )

    def reap(self, now: float) -> None:
        """Close dead idle connections, and those idle past ``idle_timeout`` down to min_size."""
        timeout = self.settings.idle_timeout
        excess = self.size - self.settings.min_size
        for conn in list(self._dispatch.idle):
            if conn.raw.is_closed():
                self._remove_idle(conn)
                self._discard(conn)
                excess -= 1
            elif timeout is not None and excess > 0 and now - conn.last_used >= timeout:
                self._remove_idle(conn)
                self._discard(conn)
                excess -= 1

    def recycle(self, now: float) -> None:
        """Close idle connections past their own jittered ``max_age``."""
        for conn in list(self._dispatch.idle):
            if conn.expires_at is not None and now >= conn.expires_at:
                self._remove_idle(conn)
                self._counters.recycles += 1
                self._discard(conn)

    def keepalive(self, now: float) -> None:
        """Ping idle connections unused for ``keepalive_interval``; dead ones are dropped."""
        interval = self.settings.keepalive_interval
        if interval is None:
            return
        for conn in list(self._dispatch.idle):
            if now - max(conn.last_used, conn.last_checked) >= interval:
                self._remove_idle(conn)
                self._set_aside(conn, self._ping)

    def watchdog(self, now: float) -> None:
        """Terminate connections whose reset or ping has run past ``connect_timeout``, and
        cancel opens past their budget.

        A server that stops answering must not keep them set aside forever; terminated, the
        work fails and the connection is discarded, which frees its slot. An open is bounded
        by its own deadline (connect and init share ``connect_timeout``, a stolen connection's
        close has as much): one still running past both, say in an ``init`` that ignores
        cancellation, is cancelled again, and its slot comes back when it ends.
        """
        limit = self.settings.connect_timeout
        for task, began in list(self._opens.items()):
            if now - began > 2 * limit:
                logger.warning(
                    "tenantpool: cancelling an open of %s: it took over %.1f s",
                    self.name,
                    2 * limit,
                )
                task.cancel()
        for conn, since in list(self._dispatch.aside.items()):
            if now - since > limit and not conn.raw.is_closed():
                conn.cut_off = True
                logger.warning(
                    "tenantpool: terminating a connection of %s: its reset or ping took over"
                    " %.1f s",
                    self.name,
                    limit,
                )
                conn.raw.terminate()

    def refill(self) -> None:
        """Open connections up to ``min_size`` with free slots only: the cap wins.

        While the target backs off, only the probe is opened, when the backoff lets it run.
        """
        missing = self.settings.min_size - self.size
        if missing <= 0 or self._closed:
            return
        if self._rejecting() is not None:
            self._refill_when_allowed()
            return
        if self._backoff.backing_off:
            # Any more would be turned away by the backoff; the probe's success fills the rest.
            missing = 1
        while missing > 0 and self._capacity.take():
            missing -= 1
            self._dispatch.granted()
            self._grow()

    def upkeep_refill(self) -> None:
        """The background task's refill: at a random moment before the next tick.

        Run at once, every pool that lost its connections to a quick server restart would
        reconnect on the same tick; spread over the interval they arrive a few at a time.
        """
        if self._refill_timer is not None or self.size >= self.settings.min_size:
            return
        delay = 0.0 if self._refill_spread is None else self._refill_spread()
        if delay <= 0:
            self.refill()
        else:
            self._refill_timer = asyncio.get_running_loop().call_later(delay, self._refill_due)

    def hurry(self, within: float) -> None:
        """Its server is back (another pool got through): retry within ``within`` seconds."""
        if self._backoff.hurry(time.monotonic(), within):
            self._refill_when_allowed()

    def _refill_when_allowed(self) -> None:
        """Below min_size while backing off: refill at the moment the next attempt is due.

        Left to the background task, the refill would wait for a tick: up to a whole
        reap_interval after the delay is over, and every target cut off by one outage would
        retry on the same tick, which defeats the backoff's jitter. At most one timer per pool;
        none when min_size is 0 or a probe is in flight (its failure arms the next one).
        """
        backoff = self._backoff
        if (
            self._closed
            or self.size >= self.settings.min_size
            or not backoff.backing_off
            or backoff.probing
        ):
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + backoff.retry_after(time.monotonic())
        timer = self._refill_timer
        if timer is not None:
            if timer.when() <= when:
                return  # it re-arms itself if it fires too early
            timer.cancel()
        self._refill_timer = loop.call_at(when, self._refill_due)

    def _refill_due(self) -> None:
        self._refill_timer = None
        try:
            self.refill()
        except Exception:
            logger.exception("tenantpool: refill failed for %s", self.name)

    def _cancel_refill_timer(self) -> None:
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None

    def forgettable(self, now: float, after: float) -> bool:
        """Whether the pool holds nothing and has been unused for ``after`` seconds."""
        return (
            now - self.last_used >= after
            and self.size == 0
            and not self._dispatch.waiters
            and not self._tasks
            and not self._backoff.probing
            # A pool promised min_size keeps trying to get there; the timer must not outlive it.
            and self._refill_timer is None
        )

    async def expire(self) -> None:
        """Replace every connection: idle ones are closed now, the others at their release.

        After a password rotation or a role change, checkouts from now on get connections
        opened from now on (one whose connect was already under way serves its checkout,
        then goes too).
        """
        self._generation += 1
        for conn in list(self._dispatch.idle):
            self._remove_idle(conn)
            self._discard(conn)
        if self._closers:
            await asyncio.wait(list(self._closers))

    # -- shutdown ----------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Refuse new checkouts and fail the waiting ones (synchronous, idempotent)."""
        self._closed = True
        self._cancel_refill_timer()
        while self._held:  # nobody will open in those slots any more
            self._slot_released()
        for waiter, queued in self._dispatch.leave_all():
            self._left(waiter, queued)
            if not waiter.future.done():
                waiter.future.set_exception(ManagerClosed("the manager is closed"))

    async def close(self, grace: float) -> None:
        """Close every connection; checked-out ones get ``grace`` seconds, then are terminated."""
        self.begin_close()
        for conn in list(self._dispatch.idle):
            self._remove_idle(conn)
            self._discard(conn)
        # Shared by every close() of the pool: each waits for the same drain.
        if self._drained is None:
            self._drained = asyncio.Event()
        drained = self._drained
        if self._dispatch.in_use or self._dispatch.aside:
            try:
                async with asyncio.timeout(grace):
                    await drained.wait()
            except TimeoutError:
                logger.warning(
                    "tenantpool: terminating %d connection(s) of %s still checked out, and"
                    " %d being reset, at close",
                    len(self._dispatch.in_use),
                    self.name,
                    len(self._dispatch.aside),
                )
        # The server notices a closed socket only when it next writes: a query it is running
        # would go on for as long as it takes, so each is cancelled too.
        cancels = []
        for conn in list(self._dispatch.in_use):
            cancels.append(_session.canceller(conn.raw))
            conn.raw.terminate()
        # Resets and pings still running fail on their own once cut off, and close their
        # connections; cancelled mid-query instead, asyncpg would open a connection of its own
        # to cancel the query, and the close would cut that one short too.
        for conn in list(self._dispatch.aside):
            conn.raw.terminate()
        if cancels:
            budget = self.settings.connect_timeout
            await asyncio.gather(*(cancel(budget) for cancel in cancels))
        # Polite closes get their own budget; opens are cut short.
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=grace)
        # Whatever these start on their way out is the manager's supervisor's to end.
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        # A reset cancelled before its first step never reached its clean-up.
        for conn in list(self._dispatch.aside):
            self._dispatch.back(conn)
            self._discard(conn)


async def _close_gracefully(raw: asyncpg.Connection, budget: float) -> bool:
    """Close ``raw`` politely (the server ends the backend), forcibly if that fails.

    Whether the server saw it through; if not, its backend may live on a while.
    """
    polite = False
    try:
        with contextlib.suppress(Exception):
            await raw.close(timeout=budget)
            polite = True
    finally:
        if not raw.is_closed():
            raw.terminate()
    return polite
