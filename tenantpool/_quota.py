"""Per-tenant quotas: the most connections one tenant holds at once (``Target.max_in_use``).

A tenant at its quota waits in a queue of its own, first come first served, before it asks
its pool for a connection; the slot a scope frees passes straight to the next waiter of its
tenant. Other tenants never queue behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ._errors import PoolTimeout

__all__ = ["Quotas"]

# A tenant over its quota learns nothing about when its own scopes end.
_RETRY_AFTER = 1.0


class Quotas:
    """Connections held per tenant under a quota, and the checkouts waiting for one."""

    __slots__ = ("_held", "_queues", "timeouts", "waiting", "waits")

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self.waiting = 0  # checkouts waiting for their tenant's quota now
        self.waits = 0  # checkouts that ever had to
        self.timeouts = 0

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    async def enter(self, tenant: str, limit: int, patience: float) -> float | None:
        """Take one of ``tenant``'s ``limit`` places, waiting up to ``patience`` seconds.

        Returns the loop time the wait began, or None if there was no wait, so that the pool
        checkout that follows counts its ``acquire_timeout`` from the same moment.
        """
        held = self._held.get(tenant, 0)
        if held < limit and tenant not in self._queues:
            self._held[tenant] = held + 1
            return None
        loop = asyncio.get_running_loop()
        began = loop.time()
        place: asyncio.Future[None] = loop.create_future()
        self._queues.setdefault(tenant, deque()).append(place)
        self.waiting += 1
        self.waits += 1
        try:
            async with asyncio.timeout(patience):
                await place
        except BaseException as exc:
            if place.done() and not place.cancelled():
                self.leave(tenant)  # granted as we gave up: pass it on
            else:
                place.cancel()
                self._drop(tenant, place)
            if isinstance(exc, TimeoutError):
                self.timeouts += 1
                raise PoolTimeout(
                    f"tenant {tenant!r} holds its max_in_use of {limit} connections;"
                    f" none came free within {patience:.2f} sec",
                    retry_after=_RETRY_AFTER,
                ) from None
            raise
        finally:
            self.waiting -= 1
        return began

    def leave(self, tenant: str) -> None:
        """A scope of ``tenant`` under its quota ended: its place goes to the next in line."""
        queue = self._queues.get(tenant)
        while queue:
            place = queue.popleft()
            if not place.done():
                place.set_result(None)  # the place changes hands: the count stays
                if not queue:
                    del self._queues[tenant]
                return
        self._queues.pop(tenant, None)
        held = self._held[tenant] - 1
        if held:
            self._held[tenant] = held
        else:
            del self._held[tenant]

    def _drop(self, tenant: str, place: asyncio.Future[None]) -> None:
        queue = self._queues.get(tenant)
        if queue is not None:
            # A waiter leaving early is rare next to checkouts; a linear remove is fine.
            try:
                queue.remove(place)
            except ValueError:
                pass
            if not queue:
                del self._queues[tenant]
