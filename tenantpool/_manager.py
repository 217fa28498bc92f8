"""``TenantPoolManager``: tenants to targets to lazily created pools, and the scopes over them."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import asyncpg

from . import _liveness
from ._backoff import Backoff
from ._capacity import Capacity
from ._deadlines import Deadlines
from ._errors import ManagerClosed, NoCurrentConnection, UnknownTenant
from ._health import HealthReport, assess
from ._maintenance import Maintenance
from ._pool import (
    InitFailed,
    Pool,
    PooledConnection,
    SharedCapacity,
    SharedDeadlines,
    carry_out,
    time_out,
)
from ._quota import Quotas
from ._resolver_cache import ResolverCache
from ._scope import (
    Scope,
    TenantConnection,
    current_scope,
    find_scope,
    pop_scope,
    running_task,
    scopes,
)
from ._session import adopt_init_session
from ._settings import (
    PoolSettings,
    SessionState,
    Target,
    dsn_secrets,
    redact_dsn,
    server_address,
)
from ._stats import Counters, ManagerStats, PoolFigures, Totals
from ._supervisor import Supervisor
from ._tenant import Resolver, TenantResolver, validate_tenant_id

__all__ = ["TenantPoolManager"]

InitCallback = Callable[[asyncpg.Connection], Awaitable[None]]

# Seconds over which the pools of a server that is back spread their next attempt: 200 pools
# make about 20 connects per 100 ms, and all are back about a second after the first.
SERVER_BACK_WINDOW = 1.0


class TenantPoolManager:
    """Checks out tenants' connections from per-target pools created on first use."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        max_total_connections: int | None = None,
        pool: PoolSettings | None = None,
        default_tenant: str | None = None,
        reap_interval: float = 1.0,
        close_timeout: float = 10.0,
        connect_kwargs: Mapping[str, Any] | None = None,
        init: InitCallback | None = None,
        forget_after: float = 300.0,
        reconnect_delay: float = 0.1,
        reconnect_delay_max: float = 15.0,
        reconnect_jitter: bool = True,
        resolver_ttl: float = 60.0,
    ) -> None:
        if max_total_connections is not None and max_total_connections < 1:
            raise ValueError("max_total_connections must be >= 1 or None")
        for name, value in (
            ("reap_interval", reap_interval),
            ("forget_after", forget_after),
            ("reconnect_delay", reconnect_delay),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not close_timeout >= 0:
            raise ValueError("close_timeout must be >= 0")
        if not reconnect_delay_max >= reconnect_delay:
            raise ValueError("reconnect_delay_max must be >= reconnect_delay")
        if default_tenant is not None:
            validate_tenant_id(default_tenant)
        # Every task the manager starts, so that close() leaves none running.
        self._supervisor = Supervisor()
        self._resolver = ResolverCache(
            TenantResolver(resolver), resolver_ttl, spawn=self._supervisor.spawn
        )
        self._quotas = Quotas()
        self.max_total_connections = max_total_connections
        self.pool_settings = pool if pool is not None else PoolSettings()
        self.default_tenant = default_tenant
        self.reap_interval = reap_interval
        self.close_timeout = close_timeout
        self._connect_kwargs = dict(connect_kwargs or {})
        self._init = init
        self.forget_after = forget_after
        self._backoff_args = (reconnect_delay, reconnect_delay_max, reconnect_jitter)
        self._pools: dict[bytes, Pool] = {}
        self._pool_names: set[str] = set()
        # Pools whose connections exceed their min_size give up idle ones first at the cap.
        self._capacity: SharedCapacity = Capacity(
            max_total_connections,
            lambda pool: pool.size > pool.settings.min_size,
            lambda pool: pool.size,
        )
        self._deadlines: SharedDeadlines = Deadlines(time_out)
        self._counters = Counters()
        self._maintenance = Maintenance(
            reap_interval,
            self._pools.values,
            (
                ("forget", self._forget_unused),
                ("saturation", self._watch_saturation),
                ("fair share", self._lend_kept),
            ),
            spawn=self._supervisor.spawn,
        )
        self._saturated_since: float | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the manager ready for checkouts."""
        if self._closed:
            raise ManagerClosed("a closed manager cannot be started again")
        running_task()  # asyncio only: fail here, clearly, rather than deep in asyncpg
        self._started = True
        self._maintenance.start()

    async def close(self) -> None:
        """Close every pool; checkouts raise ``ManagerClosed`` from now on.

        Connections still checked out get ``close_timeout`` seconds to come back, then are
        terminated, so ``close()`` never hangs on a scope that does not end. No task of the
        manager runs once it returns, and no pool is created after it began: a checkout still
        inside the resolver then raises ``ManagerClosed``.
        """
        self._closed = True
        await self._maintenance.stop()
        pools = list(self._pools.values())
        # Every pool stops taking checkouts before any closes, so that capacity freed by one
        # is not handed to a waiter of another that is about to close too.
        for pool in pools:
            pool.begin_close()
        await asyncio.gather(*(pool.close(self.close_timeout) for pool in pools))
        # Lookups still in flight, and whatever the closes started: nobody needs them now.
        await self._supervisor.stop()

    async def __aenter__(self) -> TenantPoolManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed("the manager is closed")
        if not self._started:
            raise ManagerClosed(
                "the manager is not started: use 'async with manager' or 'await manager.start()'"
            )

    # -- scopes ------------------------------------------------------------------------------

    def with_connection(self, tenant: str) -> _ScopeContext:
        """A scope holding ``tenant``'s connection: ``async with manager.with_connection(t)``."""
        if not isinstance(tenant, str):
            # None included: it is no tenant, not "the current or default one" (that is
            # connection()), so that a missing header never reaches the default tenant.
            validate_tenant_id(tenant)
        return _ScopeContext(self, tenant)

    def connection(self) -> _ScopeContext:
        """The current scope's connection, else a new scope on ``default_tenant``."""
        return _ScopeContext(self, None)

    def current_connection(self) -> TenantConnection:
        """The connection of the innermost scope this task opened; else ``NoCurrentConnection``."""
        scope = current_scope(self)
        if scope is None:
            raise NoCurrentConnection("no tenant connection scope is open in this task")
        return scope.proxy

    def current_tenant(self) -> str | None:
        """The tenant of the innermost scope this task opened, or ``None``."""
        scope = current_scope(self)
        return None if scope is None else scope.tenant

    async def resolve(self, tenant: str) -> Target:
        """Validate ``tenant`` and return its ``Target`` (``InvalidTenant``, ``UnknownTenant``)."""
        return await self._resolver.resolve(validate_tenant_id(tenant))

    def invalidate(self, tenant: str | None = None) -> None:
        """Drop ``tenant``'s cached resolution (every tenant's if None): the next scope asks
        the resolver again. Connections already open stay; ``expire`` replaces them."""
        if tenant is not None:
            validate_tenant_id(tenant)
        self._resolver.invalidate(tenant)

    async def expire(self, tenant: str | None = None) -> None:
        """Replace the connections of ``tenant``'s pool (every pool's if None).

        Idle connections are closed now, checked-out ones when they are released; checkouts
        from now on get new connections. The tenant's cached resolution is dropped first, so
        a resolver that now answers with new credentials is asked again (a new DSN is a new
        pool; the old one's connections are replaced all the same).
        """
        if tenant is None:
            self._resolver.invalidate()
            pools = list(self._pools.values())
        else:
            validate_tenant_id(tenant)
            old = self._resolver.cached(tenant)
            self._resolver.invalidate(tenant)
            keys = {old.pool_key} if old is not None else set()
            try:
                keys.add((await self._resolver.resolve(tenant)).pool_key)
            except UnknownTenant:
                if not keys:
                    raise
            pools = [self._pools[key] for key in keys if key in self._pools]
        await asyncio.gather(*(pool.expire() for pool in pools))

    def _pool_for(self, target: Target) -> Pool:
        # Created without an await between lookup and insert, so concurrent first checkouts
        # of one target always share one pool.
        pool = self._pools.get(target.pool_key)
        if pool is None:
            settings = target.pool or self.pool_settings
            first, cap, jitter = self._backoff_args
            pool = Pool(
                self._unique_name(redact_dsn(target.dsn)),
                settings,
                self._connector(target.dsn, settings),
                secrets=_secrets_of(target.dsn, self._connect_kwargs),
                capacity=self._capacity,
                deadlines=self._deadlines,
                counters=self._counters,
                spawn=self._supervisor.spawn,
                backoff=Backoff(first=first, cap=cap, rng=random.random if jitter else _no_jitter),
                lifetime_draw=random.random,
                server=server_address(target.dsn),
                # Without jitter every target keeps to its own plain exponential schedule.
                on_back=self._server_back if jitter else None,
                refill_spread=self._refill_spread if jitter else None,
            )
            self._pools[target.pool_key] = pool
        return pool

    def _refill_spread(self) -> float:
        return random.random() * self.reap_interval

    def _server_back(self, back: Pool) -> None:
        """``back`` just reached its server after an outage: its neighbours may retry soon.

        Their own backoff may have drawn waits of many seconds; each now draws a moment within
        the next ``SERVER_BACK_WINDOW`` instead, so they return soon but not in a herd.
        """
        for pool in self._pools.values():
            if pool is not back and pool.backing_off and pool.server == back.server:
                pool.hurry(SERVER_BACK_WINDOW)

    def _forget_unused(self, now: float) -> None:
        """Drop pools that hold nothing and went unused for ``forget_after`` seconds, and
        expired resolutions.

        Memory then stays bounded by recent tenants, not by every tenant ever seen.
        """
        self._resolver.purge(now)
        for key, pool in list(self._pools.items()):
            if pool.forgettable(now, self.forget_after):
                del self._pools[key]
                self._pool_names.discard(pool.name)
                self._counters.failing.pop(pool.name, None)

    def _lend_kept(self, now: float) -> None:
        """Idle connections a pool within its fair share kept from busier pools go to whoever
        still queues at the cap: kept for one tick at most."""
        for steal in self._capacity.offer():
            carry_out(self._capacity, steal)

    def _watch_saturation(self, now: float) -> float:
        """Seconds every slot under the cap has been busy (nothing idle to steal), else 0."""
        capacity = self._capacity
        if not (capacity.saturated and capacity.idle == 0):
            self._saturated_since = None
            return 0.0
        if self._saturated_since is None:
            self._saturated_since = now
        return now - self._saturated_since

    def _unique_name(self, name: str) -> str:
        # Two DSNs can differ only by password; their redacted names must not collide.
        unique, n = name, 1
        while unique in self._pool_names:
            n += 1
            unique = f"{name}#{n}"
        self._pool_names.add(unique)
        return unique

    def _connector(
        self, dsn: str, settings: PoolSettings
    ) -> Callable[[], Awaitable[asyncpg.Connection]]:
        kwargs = self._connect_kwargs
        if settings.state_scope == "transaction":
            # Behind a transaction pooler consecutive transactions reach different server
            # connections, where statements asyncpg prepared and cached on another do not
            # exist. Unnamed statements live within one transaction, so they are safe.
            kwargs = {"statement_cache_size": 0, **kwargs}

        async def connect() -> asyncpg.Connection:
            # Connect and init share one deadline: a stalled init must not hold its slot.
            budget = settings.connect_timeout
            deadline = asyncio.get_running_loop().time() + budget
            raw: asyncpg.Connection = await asyncpg.connect(dsn, timeout=budget, **kwargs)
            _liveness.watch(raw)
            if self._init is None:
                return raw
            try:
                async with asyncio.timeout_at(deadline):
                    await self._init(raw)
                    left = deadline - asyncio.get_running_loop().time()
                    await adopt_init_session(raw, budget=max(left, 0.001))
            except BaseException as exc:
                lost = raw.is_closed()  # the server went away under init: an outage
                raw.terminate()
                if isinstance(exc, TimeoutError) and not lost:
                    raise InitFailed(
                        TimeoutError(f"init did not finish within connect_timeout ({budget} s)")
                    ) from exc
                if isinstance(exc, Exception) and not lost:
                    raise InitFailed(exc) from exc
                raise
            return raw

        return connect

    # -- observability -----------------------------------------------------------------------

    def stats(self) -> ManagerStats:
        """Counts over every pool: total, in use, idle, waiting, per pool by name, counters.

        The totals are running figures; ``pools`` passes over the pools when it is first read
        (so stats() itself costs the same with ten thousand pools as with one).
        """
        counters = self._counters
        totals = self._totals()
        return ManagerStats(
            total=totals.total,
            in_use=totals.in_use,
            idle=totals.idle,
            waiting=totals.waiting,
            max_total=totals.max_total,
            pools=PoolFigures(list(self._pools.values())),
            checkouts=counters.checkouts,
            timeouts=counters.timeouts + self._quotas.timeouts + self._resolver.timeouts,
            steals=counters.steals,
            recycles=counters.recycles,
            connect_errors=counters.connect_errors,
            backing_off=len(counters.failing),
            wait_time=counters.wait_times(),
            quota_waiting=self._quotas.waiting,
            quota_waits=self._quotas.waits,
        )

    def _totals(self) -> Totals:
        counters = self._counters
        return Totals(
            targets=len(self._pools),
            # Every connection of every pool holds a slot of the capacity, and only they do.
            total=self._capacity.total,
            in_use=counters.in_use,
            idle=counters.idle,
            waiting=counters.waiting,
            max_total=self.max_total_connections,
        )

    async def health(self) -> HealthReport:
        """``ok``, ``degraded`` or ``failing``, with the figures behind the verdict."""
        loop_now = asyncio.get_running_loop().time()
        return assess(
            self._totals(),
            closed=self._closed,
            background_task=self._maintenance.state,
            longest_wait=self._deadlines.oldest_wait(loop_now),
            saturated_for=self._watch_saturation(time.monotonic()),
            backing_off=tuple(self._counters.failing),
        )

    def __repr__(self) -> str:
        s = self._totals()
        state = "closed" if self._closed else "open" if self._started else "not started"
        cap = "none" if s.max_total is None else str(s.max_total)
        return (
            f"<TenantPoolManager {state} | Requests: {s.in_use} active, {s.waiting} queued"
            f" | Connections: {s.total} of cap {cap} ({s.idle} idle) in {s.targets} pools>"
        )


def _no_jitter() -> float:
    return 1.0


def _secrets_of(dsn: str, connect_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """The passwords a pool connects with, in the forms they may appear in, to scrub them."""
    found = dsn_secrets(dsn)
    extra = connect_kwargs.get("password")
    return (*found, extra) if isinstance(extra, str) and extra else found


class _ScopeContext:
    """``async with`` over one scope; a class rather than a generator for a cheap hot path."""

    __slots__ = ("_checkout", "_manager", "_scope", "_tenant")

    def __init__(self, manager: TenantPoolManager, tenant: str | None) -> None:
        self._manager = manager
        self._tenant = tenant
        self._scope: Scope | None = None
        # What this block checked out, if it did not reuse an outer scope: the pool, the
        # connection, the state it carries, and whether it holds a place of its tenant's quota.
        self._checkout: tuple[Pool, PooledConnection, SessionState, bool] | None = None

    async def __aenter__(self) -> TenantConnection:
        if self._scope is not None:
            raise RuntimeError("this scope context is already in use; call with_connection again")
        manager = self._manager
        tenant = self._tenant
        task = running_task()
        if tenant is None:  # manager.connection()
            scope = current_scope(manager, task)
            if scope is None:
                if manager.default_tenant is None:
                    raise NoCurrentConnection(
                        "no tenant connection scope is open in this task"
                        " and no default_tenant is set"
                    )
                tenant = manager.default_tenant
                scope = find_scope(manager, tenant, task)
        else:
            validate_tenant_id(tenant)
            # The same tenant nested in this task reuses the outer connection: no second
            # checkout, so no deadlock at max_size=1.
            scope = find_scope(manager, tenant, task)
        if scope is None:
            assert tenant is not None  # set whenever no scope was found
            manager._check_open()
            # Resolving counts against the checkout's acquire_timeout, as waiting does.
            resolver, started = manager._resolver, None
            try:
                if resolver.must_ask(tenant):
                    started = asyncio.get_running_loop().time()
                    patience = manager.pool_settings.acquire_timeout
                    target = await resolver.resolve(tenant, patience)
                else:
                    target = await resolver.resolve(tenant)
            except asyncio.CancelledError:
                if manager._closed and not task.cancelling():
                    # close() ended the lookup this checkout shared, not its caller.
                    raise ManagerClosed("the manager is closed") from None
                raise
            # close() may have run meanwhile: it must not be followed by a new pool.
            manager._check_open()
            pool = manager._pool_for(target)
            limit = target.max_in_use
            if limit is None:
                conn = await pool.acquire(target.session_state, tenant=tenant, started=started)
            else:
                quotas = manager._quotas
                patience = pool.settings.acquire_timeout
                if started is not None:
                    patience -= asyncio.get_running_loop().time() - started
                began = await quotas.enter(tenant, limit, patience)
                if started is None:
                    started = began
                try:
                    conn = await pool.acquire(target.session_state, tenant=tenant, started=started)
                except BaseException:
                    quotas.leave(tenant)
                    raise
            scope = Scope(manager, tenant, pool, conn, task)
            self._checkout = (pool, conn, target.session_state, limit is not None)
        # A reused scope is pushed again too: it is the current one until this block ends.
        self._scope = scope
        scopes.set((*scopes.get(), scope))
        return scope.proxy

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._scope
        assert scope is not None, "__aexit__ without __aenter__"
        self._scope = None
        # No await until the release: a cancellation cannot cut it short (a commit, the one
        # await, gives the connection back itself whatever happens).
        pop_scope(scope)
        checkout, self._checkout = self._checkout, None
        if checkout is not None:
            pool, conn, used = scope.end()
            try:
                if not pool.per_transaction:
                    pool.release(conn, dirty=used)
                elif exc_type is None and used:
                    try:
                        await pool.commit(conn)
                    except Exception as error:
                        _liveness.raise_if_lost(conn.raw, scope.tenant, error)
                        raise
                else:
                    # Nothing to keep: the rollback runs off the caller's path.
                    pool.release(conn, dirty=True)
            finally:
                if checkout[3]:
                    self._manager._quotas.leave(scope.tenant)

    async def commit_and_continue(self) -> None:
        """Per transaction, commit the scope's work so far and go on in a new transaction
        carrying the same state; nothing to do per session or for a scope this block reused.

        What a web response reports must have committed before it goes out; the request may
        still use its connection afterwards (a streaming body, background tasks).
        """
        if self._checkout is not None and self._checkout[0].per_transaction:
            pool, conn, state, _ = self._checkout
            await pool.commit_and_begin(conn, state)
