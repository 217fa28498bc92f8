"""The hard cap across pools, as a pure state machine: no I/O, no awaits, no clock.

It decides; the pools act. A *slot* is the right to hold one connection, open or being opened
or being closed, so ``total`` is what the server may see at any instant and never exceeds
``limit``. A request that needs a new connection while every slot is taken either *steals* a
slot (the least recently used idle connection of another pool is closed, and its slot passes
to the request once closed) or queues, first come first served across all pools. Every event
that frees capacity hands it to the head of the queue at once, so no request waits while a
slot or a stealable idle connection exists.

A pool whose own checkouts wait would serve them with each connection it gets back, and
never let one go to a request of another pool queued here: a busy tenant would starve a quiet
one. So while pools holding more than their fair share of the cap (the cap divided among them
and the pools queued here) keep connections for their own checkouts, every ``limit + 1``-th
one is passed on to the first request of another pool instead: a queued request waits for at
most about ``limit`` releases. Passing costs a reconnect, so pools within their share keep
theirs, and shares settle instead of churning. For the same reason a pool within its share
keeps its idle connections from a pool at or over its own (a quiet tenant between two
checkouts would otherwise lose its connection to the busy one each time, and wait for a
connect every time): ``offer``, run by the background task, hands such kept connections to
whoever queues, so one kept by a tenant that went quiet is lent out within a tick.

The pools call it synchronously from their own state transitions and carry out its decisions.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterator
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
    ``size_of(pool)`` is how many connections a pool holds, for its fair share; without it a
    pool keeps whatever it gets back.
    """

    def __init__(
        self,
        limit: int | None,
        above_min: Callable[[P], bool],
        size_of: Callable[[P], int] | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1 or None")
        self.limit = limit
        self.total = 0
        self._above_min = above_min
        self._size_of = size_of
        # Arrival order; an entry is live while ``_queued`` maps its request to its number, so
        # that a withdrawal is O(1) and stale entries are dropped as the head reaches them.
        self._queue: deque[tuple[int, R, P]] = deque()
        self._queued: dict[R, tuple[int, P]] = {}
        self._queued_pools: dict[P, int] = {}  # live entries per pool
        self._numbers = itertools.count()
        self._kept = 0  # releases kept by pools over their share since the last pass
        # Idle connections in the order they became idle: iteration starts at the LRU.
        self._idle: dict[C, P] = {}

    @property
    def waiting(self) -> int:
        return len(self._queued)

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
        if not self._queued:  # first come first served: nobody may pass the queue
            if not self.saturated:
                self.total += 1
                return Grant(request)
            victim = self._victim(exclude=pool, fair=True)
            if victim is not None:
                return Steal(request, self._idle.pop(victim), victim)
        number = next(self._numbers)
        self._queue.append((number, request, pool))
        self._queued[request] = (number, pool)
        self._queued_pools[pool] = self._queued_pools.get(pool, 0) + 1
        return None

    def take(self) -> bool:
        """Take a free slot without queueing or stealing (refilling ``min_size``): the cap and
        everyone queued come first."""
        if self._queued or self.saturated:
            return False
        self.total += 1
        return True

    def withdraw(self, request: R) -> bool:
        """Take a queued request out (served another way, timed out, cancelled); O(1)."""
        entry = self._queued.get(request)
        if entry is None:
            return False
        self._dequeue(request, entry[1])
        return True

    # -- events ------------------------------------------------------------------------------

    def closed(self) -> Grant[R] | None:
        """A connection is gone, or a granted open failed: the slot goes to the queue's head."""
        for _, request, pool in self._live():
            self._dequeue(request, pool)
            return Grant(request)
        self.total -= 1
        if self.total < 0:
            raise AssertionError("more slots freed than taken")
        return None

    def became_idle(self, conn: C, pool: P) -> Steal[P, C, R] | None:
        """``conn`` of ``pool`` is idle: steal it at once for a queued request of another pool,
        unless ``pool`` is within its fair share and the requester is not."""
        if conn in self._idle:
            raise ValueError("connection is already idle")
        request = self._first_of_another(pool, fair=True)
        if request is not None:
            return Steal(request, pool, conn)
        self._idle[conn] = pool
        return None

    def offer(self) -> list[Steal[P, C, R]]:
        """Steal idle connections for queued requests, fair shares aside: what pools within
        their share kept back goes to whoever still queues (the background task's duty)."""
        steals: list[Steal[P, C, R]] = []
        while self._idle and self._queued:
            for _, request, pool in self._live():
                victim = self._victim(exclude=pool, fair=False)
                if victim is not None:
                    self._dequeue(request, pool)
                    steals.append(Steal(request, self._idle.pop(victim), victim))
                    break
            else:
                break  # every idle connection belongs to the pool of each queued request
        return steals

    def pass_on(self, conn: C, pool: P) -> Steal[P, C, R] | None:
        """``pool`` got ``conn`` back and has checkouts of its own waiting: should the
        connection be closed for a queued request of another pool instead? Only when ``pool``
        holds more than its fair share (the cap divided among it and the other pools queued
        here), and then once per ``limit + 1`` such releases."""
        if self._size_of is None or self.limit is None:
            return None
        others = len(self._queued_pools) - (pool in self._queued_pools)
        if not others or self._size_of(pool) * (others + 1) <= self.limit:
            return None
        self._kept += 1
        if self._kept <= self.limit:
            return None
        self._kept = 0
        request = self._first_of_another(pool)
        assert request is not None, "another pool has a request queued"
        return Steal(request, pool, conn)

    def not_idle(self, conn: C) -> None:
        """``conn`` left the idle set (taken by its pool, or closed by it)."""
        self._idle.pop(conn, None)

    # -- the queue ---------------------------------------------------------------------------

    def _live(self) -> Iterator[tuple[int, R, P]]:
        """The live entries of the queue, first come first; stale ones at its head go."""
        queue, queued = self._queue, self._queued
        while queue and queued.get(queue[0][1], (None,))[0] != queue[0][0]:
            queue.popleft()
        for entry in queue:
            if queued.get(entry[1], (None,))[0] == entry[0]:
                yield entry

    def _dequeue(self, request: R, pool: P) -> None:
        del self._queued[request]
        left = self._queued_pools[pool] - 1
        if left:
            self._queued_pools[pool] = left
        else:
            del self._queued_pools[pool]

    def _first_of_another(self, pool: P, *, fair: bool = False) -> R | None:
        """Take the first queued request of a pool other than ``pool`` out of the queue; with
        ``fair``, the first that ``pool``'s fair share does not keep back."""
        if not self._queued_pools or self._queued_pools.keys() == {pool}:
            return None  # without scanning a long queue that is all ``pool``'s
        for _, request, wanting in self._live():
            if wanting != pool and not (fair and self._keeps(pool, wanting)):
                self._dequeue(request, wanting)
                return request
        return None

    def _keeps(self, pool: P, requester: P) -> bool:
        """Whether ``pool`` keeps its idle connections from ``requester``: it holds no more than
        its fair share, and the requester no less than its own."""
        if self._size_of is None or self.limit is None:
            return False
        pools = self._queued_pools
        competing = len(pools) + (pool not in pools) + (requester not in pools)
        return self._size_of(pool) * competing <= self.limit <= self._size_of(requester) * competing

    # -- the victim --------------------------------------------------------------------------

    def _victim(self, exclude: P, *, fair: bool) -> C | None:
        """The idle connection to steal for a request of ``exclude``: least recently used
        first, of a pool above its ``min_size`` first; with ``fair``, none that its pool's
        fair share keeps."""
        fallback: C | None = None
        for conn, pool in self._idle.items():
            if pool == exclude or (fair and self._keeps(pool, exclude)):
                continue
            if self._above_min(pool):
                return conn
            if fallback is None:
                fallback = conn
        return fallback
