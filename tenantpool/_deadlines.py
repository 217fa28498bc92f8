"""When queued checkouts give up: one heap and one timer for every pool of a manager.

Expiry looks at the heap's head only, so a firing costs O(log n) per checkout that times out,
never a rescan of everyone waiting. Checkouts served before their deadline leave their entry
behind; it is dropped when it reaches the head, or in one pass once such entries outnumber the
live ones (amortized O(1) a checkout). At most ``batch`` checkouts are failed per turn of the
event loop, the rest on the next turns: ten thousand timing out together never freeze it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["Deadlines"]


class _Waiting(Protocol):
    waiting: bool  # still queued: not served, failed or cancelled
    since: float  # loop time it began waiting


W = TypeVar("W", bound=_Waiting)


class Deadlines(Generic[W]):
    """Calls ``expired(w)`` for each waiter ``w`` still waiting at its deadline (loop time)."""

    __slots__ = ("_arrivals", "_batch", "_expired", "_heap", "_live", "_numbers", "_timer")

    def __init__(self, expired: Callable[[W], None], batch: int = 256) -> None:
        self._expired = expired
        self._batch = batch
        self._heap: list[tuple[float, int, W]] = []
        self._arrivals: deque[W] = deque()  # in arrival order, for the oldest wait
        self._numbers = itertools.count()  # equal deadlines: first come first
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return self._live

    def add(self, deadline: float, waiter: W) -> None:
        heapq.heappush(self._heap, (deadline, next(self._numbers), waiter))
        self._arrivals.append(waiter)
        self._live += 1
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def left(self) -> None:
        """A waiter added here stopped waiting (served, failed or cancelled)."""
        self._live -= 1
        heap = self._heap
        if not self._live:
            # Nobody left to time out; a pending timer would also keep the pools it names
            # alive until it fired.
            heap.clear()
            self._arrivals.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif len(heap) > 2 * self._live + 64:
            heap[:] = [entry for entry in heap if entry[2].waiting]
            heapq.heapify(heap)
            self._arrivals = deque(w for w in self._arrivals if w.waiting)

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting checkout has waited (loop time), 0.0 if none."""
        arrivals = self._arrivals
        while arrivals and not arrivals[0].waiting:
            arrivals.popleft()
        return now - arrivals[0].since if arrivals else 0.0

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._heap
        done = 0
        while heap and done < self._batch:
            deadline, _, waiter = heap[0]
            if not waiter.waiting:
                heapq.heappop(heap)
                continue
            if deadline > now:
                break
            heapq.heappop(heap)
            done += 1
            self._expired(waiter)  # which calls left()
        if heap and self._timer is None:
            # A full batch: the rest on the next turn, after whatever else is ready.
            due = now if done == self._batch else heap[0][0]
            self._timer = loop.call_at(due, self._fire)
