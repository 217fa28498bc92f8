"""The figures the manager reports: snapshots per pool and overall, and the running counters.

Counters live in one ``Counters`` object shared by every pool of a manager, so that forgetting
an unused pool loses none of them. They are plain integer bumps on the checkout path; the wait
histogram records only checkouts that had to wait (the fast path adds nothing but a count), and
zero-wait checkouts are folded into its first bucket when a snapshot is taken.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "WAIT_BUCKETS",
    "Counters",
    "ManagerStats",
    "PoolFigures",
    "PoolStats",
    "Totals",
    "WaitTimes",
]

# Upper bounds (seconds) of the checkout wait histogram, Prometheus' default ladder.
WAIT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool: its connections by state and its requests."""

    name: str
    size: int  # every connection of the pool: in use, idle, opening, releasing and closing
    in_use: int
    idle: int
    waiting: int
    min_size: int
    max_size: int
    opening: int
    releasing: int  # being reset after a scope, or pinged by the background task
    closing: int
    checkouts: int
    backing_off: bool  # connects to this target are failing: checkouts fail fast
    retry_after: float  # seconds until the next reconnect attempt, 0.0 when healthy


class _Pool(Protocol):
    @property
    def name(self) -> str: ...

    def stats(self) -> PoolStats: ...


class PoolFigures(Mapping[str, PoolStats]):
    """Every pool's snapshot by name, taken all at once when the mapping is first read.

    ``stats()`` hands this out without passing over the pools, so that its totals cost the
    same with ten thousand pools as with one; a caller that reads the per-pool figures pays
    for them then (a few microseconds a pool).
    """

    __slots__ = ("_pools", "_taken")

    def __init__(self, pools: Sequence[_Pool]) -> None:
        self._pools = pools
        self._taken: dict[str, PoolStats] | None = None

    def _snapshot(self) -> dict[str, PoolStats]:
        if self._taken is None:
            self._taken = {pool.name: pool.stats() for pool in self._pools}
            self._pools = ()
        return self._taken

    def __getitem__(self, name: str) -> PoolStats:
        return self._snapshot()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot())

    def __len__(self) -> int:
        return len(self._snapshot())

    def __repr__(self) -> str:
        return f"PoolFigures({self._snapshot()!r})"


@dataclass(frozen=True, slots=True)
class Totals:
    """What every pool of a manager holds right now, from running figures (no per-pool pass)."""

    targets: int  # pools the manager knows
    total: int
    in_use: int
    idle: int
    waiting: int
    max_total: int | None


@dataclass(frozen=True, slots=True)
class WaitTimes:
    """A histogram of checkout wait times, cumulative as Prometheus expects.

    ``buckets`` pairs each upper bound of ``WAIT_BUCKETS`` with the number of checkouts that
    waited at most that long; ``count`` (the ``+Inf`` bucket) and ``sum`` cover all of them.
    """

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class ManagerStats:
    """A snapshot of every pool's connections and requests, and the counters; no passwords."""

    total: int  # open connections over all pools, those being opened or closed included
    in_use: int
    idle: int
    waiting: int
    max_total: int | None
    pools: Mapping[str, PoolStats]  # a PoolFigures: each pool's snapshot, taken when first read
    checkouts: int  # completed checkouts (a nested scope reusing its outer one is not one)
    timeouts: int  # PoolTimeout raised (quota waits and resolver lookups that ran out included)
    steals: int  # idle connections of one pool closed to make room for another at the cap
    recycles: int  # connections closed for reaching their max_age
    connect_errors: int  # failed connection attempts
    backing_off: int  # pools whose target is failing
    wait_time: WaitTimes
    quota_waiting: int = 0  # checkouts waiting because their tenant holds its max_in_use
    quota_waits: int = 0  # checkouts that ever had to


class Counters:
    """Running totals and current figures shared by a manager's pools; mutated in place,
    snapshotted on demand."""

    __slots__ = (
        "_slow",
        "checkouts",
        "connect_errors",
        "failing",
        "idle",
        "in_use",
        "recycles",
        "steals",
        "timeouts",
        "wait_count",
        "wait_sum",
        "waiting",
    )

    def __init__(self) -> None:
        # What every pool holds right now, kept as the pools change, so that the totals of
        # stats() and health() cost the same with ten thousand pools as with one.
        self.in_use = 0
        self.idle = 0
        self.waiting = 0
        self.failing: dict[str, None] = {}  # names of the pools backing off, in order
        self.checkouts = 0
        self.timeouts = 0
        self.steals = 0
        self.recycles = 0
        self.connect_errors = 0
        # Checkouts that waited, by bucket (the last slot is past the largest bound).
        self._slow = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_count = 0
        self.wait_sum = 0.0

    def waited(self, seconds: float) -> None:
        """Record a checkout that did not find an idle connection at once."""
        self._slow[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.wait_count += 1
        self.wait_sum += seconds

    def wait_times(self) -> WaitTimes:
        # Checkouts that never waited count as zero-second waits, in the first bucket.
        running = self.checkouts - self.wait_count
        buckets = []
        for bound, n in zip(WAIT_BUCKETS, self._slow, strict=False):
            running += n
            buckets.append((bound, running))
        return WaitTimes(buckets=tuple(buckets), count=self.checkouts, sum=self.wait_sum)
