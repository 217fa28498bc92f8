"""The hard cap across pools, as a pure state machine: no I/O, no awaits, no clock.

It decides; the pools act. A *slot* is the right to hold one connection, open or being opened
or being closed, so ``total`` is what the server may see at any instant and never exceeds
``limit``. A request that needs a new connection while every slot is taken either *steals* a
slot (the least recently used idle connection of another pool is closed, and its slot passes
to the request once closed) or queues, first come first served across all pools. Every event
that frees capacity hands it to the head of the queue at once, so no request waits while a
slot or a stealable idle connection exists.

The pools call it synchronously from their own state transitions and carry out its decisions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Capacity", "Grant", "Steal"]

P = TypeVar("P", bound=Hashable)  # a pool
C = TypeVar("C", bound=Hashable)  # an idle connection
R = TypeVar("R", bound=Hashable)  # a request for a slot


@dataclass(frozen=True, slots=True)
class Grant(Generic[R]):
    """``request`` holds a slot now: it may open a connection."""

    request: R


@dataclass(frozen=True, slots=True)
class Steal(Generic[P, C, R]):
    """Close ``conn`` of ``pool`` (already out of the idle index); its slot is ``request``'s.

    The slot stays counted while the connection closes, so that the server never sees more
    than ``limit`` connections; the request may open once the close is done.
    """

    request: R
    pool: P
    conn: C


Decision = Grant[R] | Steal[P, C, R] | None  # None: the request is queued


class Capacity(Generic[P, C, R]):
    """Slots against the cap, the FIFO queue across pools and the LRU index of idle connections.

    ``above_min(pool)`` tells whether a pool holds more connections than its ``min_size``: such
    pools' idle connections are stolen first. The cap still wins over ``min_size``.
    """

    def __init__(self, limit: int | None, above_min: Callable[[P], bool]) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1 or None")
        self.limit = limit
        self.total = 0
        self._above_min = above_min
        self._queue: deque[tuple[R, P]] = deque()
        self._queued: set[R] = set()
        # Idle connections in the order they became idle: iteration starts at the LRU.
        self._idle: dict[C, P] = {}

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def saturated(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def __repr__(self) -> str:
        limit = "none" if self.limit is None else self.limit
        return f"<Capacity {self.total}/{limit} slots, {self.idle} idle, {self.waiting} queued>"

    # -- requests ----------------------------------------------------------------------------

    def request(self, request: R, pool: P) -> Decision[R, P, C]:
        """A request of ``pool`` needs a new connection: grant, steal for it, or queue it.

        Call it only when ``pool`` has no idle connection of its own to hand out.
        """
        if request in self._queued:
            raise ValueError("request is already queued")
        if not self._queue:  # first come first served: nobody may pass the queue
            if not self.saturated:
                self.total += 1
                return Grant(request)
            victim = self._victim(exclude=pool)
            if victim is not None:
                return Steal(request, self._idle.pop(victim), victim)
        self._queue.append((request, pool))
        self._queued.add(request)
        return None

    def take(self) -> bool:
        """Take a free slot without queueing or stealing (refilling ``min_size``): the cap and
        everyone queued come first."""
        if self._queue or self.saturated:
            return False
        self.total += 1
        return True

    def withdraw(self, request: R) -> bool:
        """Take a queued request out (served another way, timed out, cancelled)."""
        if request not in self._queued:
            return False
        self._queued.discard(request)
        self._queue = deque(entry for entry in self._queue if entry[0] != request)
        return True

    # -- events ------------------------------------------------------------------------------

    def closed(self) -> Grant[R] | None:
        """A connection is gone, or a granted open failed: the slot goes to the queue's head."""
        if self._queue:
            request, _ = self._queue.popleft()
            self._queued.discard(request)
            return Grant(request)
        self.total -= 1
        if self.total < 0:
            raise AssertionError("more slots freed than taken")
        return None

    def became_idle(self, conn: C, pool: P) -> Steal[P, C, R] | None:
        """``conn`` of ``pool`` is idle: steal it at once for a queued request of another pool."""
        if conn in self._idle:
            raise ValueError("connection is already idle")
        for index, (request, wanting) in enumerate(self._queue):
            if wanting != pool:
                del self._queue[index]
                self._queued.discard(request)
                return Steal(request, pool, conn)
        self._idle[conn] = pool
        return None

    def not_idle(self, conn: C) -> None:
        """``conn`` left the idle set (taken by its pool, or closed by it)."""
        self._idle.pop(conn, None)

    # -- the victim --------------------------------------------------------------------------

    def _victim(self, exclude: P) -> C | None:
        fallback: C | None = None
        for conn, pool in self._idle.items():
            if pool == exclude:
                continue
            if self._above_min(pool):
                return conn
            if fallback is None:
                fallback = conn
        return fallback
