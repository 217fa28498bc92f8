"""The resolver's cache: a tenant's ``Target`` reused for ``resolver_ttl`` seconds.

An unknown tenant is remembered too, for at most ``UNKNOWN_TTL``: a flood of requests for a
tenant that does not exist costs the registry one lookup a second, and a tenant created
meanwhile is found soon after. Concurrent lookups of one tenant share a single call of the
resolver. A resolver that raises is not cached: the next scope asks again. A ``Mapping``
resolver is read on every scope, since a dict lookup is cheaper than the cache.

A checkout waits for the resolver within its ``acquire_timeout``, like for a connection: a
resolver that hangs costs the caller a ``PoolTimeout``, not a request stuck forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ._errors import PoolTimeout, UnknownTenant
from ._settings import Target
from ._tenant import TenantResolver

__all__ = ["UNKNOWN_TTL", "ResolverCache"]

UNKNOWN_TTL = 1.0
# Seconds a caller whose lookup timed out is told to wait before trying again.
_TIMEOUT_RETRY_AFTER = 1.0


class ResolverCache:
    """Resolved targets by tenant id, with their expiry, and the lookups in flight."""

    __slots__ = (
        "_clock",
        "_entries",
        "_inflight",
        "_resolver",
        "_spawn",
        "_ttl",
        "_unknown_ttl",
        "timeouts",
    )

    def __init__(
        self,
        resolver: TenantResolver,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        spawn: Callable[[Coroutine[Any, Any, Target]], asyncio.Task[Target]] | None = None,
    ) -> None:
        if not ttl >= 0:
            raise ValueError(f"resolver_ttl must be >= 0, got {ttl}")
        self._resolver = resolver
        self._ttl = ttl if not resolver.is_mapping else 0.0
        self._unknown_ttl = min(ttl, UNKNOWN_TTL)
        self._clock = clock
        # Lookups run in tasks of the manager's supervisor, so that close() awaits them.
        self._spawn = spawn if spawn is not None else _create_task
        # tenant -> (expires at, its Target or None for unknown)
        self._entries: dict[str, tuple[float, Target | None]] = {}
        self._inflight: dict[str, asyncio.Task[Target]] = {}
        self.timeouts = 0  # lookups that cost their caller a PoolTimeout

    def __len__(self) -> int:
        return len(self._entries)

    def must_ask(self, tenant: str) -> bool:
        """Whether resolving ``tenant`` now calls the resolver (it may then have to wait)."""
        if self._resolver.is_mapping:
            return False
        entry = self._entries.get(tenant)
        return entry is None or self._clock() >= entry[0]

    async def resolve(self, tenant: str, patience: float | None = None) -> Target:
        """The ``Target`` of an already validated tenant id, else ``UnknownTenant``; if the
        resolver is asked and has not answered within ``patience`` seconds, ``PoolTimeout``."""
        if not self._ttl:
            if patience is None or self._resolver.is_mapping:  # a dict lookup cannot hang
                return await self._resolver.resolve(tenant)
            return await self._within(self._resolver.resolve(tenant), tenant, patience)
        entry = self._entries.get(tenant)
        if entry is not None:
            expires, target = entry
            if self._clock() < expires:
                if target is None:
                    raise UnknownTenant(f"unknown tenant {tenant!r}")
                return target
            del self._entries[tenant]
        task = self._inflight.get(tenant)
        if task is None:
            task = self._spawn(self._lookup(tenant))
            self._inflight[tenant] = task
        # Shielded: a caller that gives up must not cancel the lookup others wait on.
        if patience is None:
            return await asyncio.shield(task)
        return await self._within(asyncio.shield(task), tenant, patience)

    async def _lookup(self, tenant: str) -> Target:
        me = asyncio.current_task()
        try:
            try:
                target = await self._resolver.resolve(tenant)
            except UnknownTenant:
                self._remember(me, tenant, None, self._unknown_ttl)
                raise
            self._remember(me, tenant, target, self._ttl)
            return target
        finally:
            if self._inflight.get(tenant) is me:
                del self._inflight[tenant]

    def _remember(self, lookup: object, tenant: str, target: Target | None, ttl: float) -> None:
        # Only while still the tenant's current lookup: invalidate() during the call means
        # its answer may already be stale.
        if self._inflight.get(tenant) is lookup and ttl > 0:
            self._entries[tenant] = (self._clock() + ttl, target)

    def cached(self, tenant: str) -> Target | None:
        """The cached ``Target`` of ``tenant``, expired or not, if there is one."""
        entry = self._entries.get(tenant)
        return None if entry is None else entry[1]

    def invalidate(self, tenant: str | None = None) -> None:
        """Forget ``tenant`` (every tenant if None), lookups in flight included."""
        if tenant is None:
            self._entries.clear()
            self._inflight.clear()
        else:
            self._entries.pop(tenant, None)
            self._inflight.pop(tenant, None)

    def purge(self, now: float) -> None:
        """Drop expired entries, so memory follows the tenants seen lately."""
        expired = [tenant for tenant, (expires, _) in self._entries.items() if expires <= now]
        for tenant in expired:
            del self._entries[tenant]

    async def _within(self, lookup: Awaitable[Target], tenant: str, patience: float) -> Target:
        deadline = asyncio.timeout(patience)
        try:
            async with deadline:
                return await lookup
        except TimeoutError:
            if not deadline.expired():
                raise  # the resolver's own timeout, not ours: its error, as it raised it
            self.timeouts += 1
            raise PoolTimeout(
                f"the resolver did not answer for tenant {tenant!r} within {patience:.2f} sec"
                " (acquire_timeout)",
                retry_after=_TIMEOUT_RETRY_AFTER,
            ) from None


def _create_task(coro: Coroutine[Any, Any, Target]) -> asyncio.Task[Target]:
    return asyncio.get_running_loop().create_task(coro)
