"""Who gets which connection of one pool, as a pure state machine: no I/O, no awaits, no clock.

It decides; the pool acts (as ``_capacity`` does for the cap across pools). It holds the pool's
connections by state — idle (indexed by the session state they carry), in use, set aside for a
reset or a ping, being opened, being closed — and its waiting checkouts, in the order their
turn comes: round robin across tenants, first come first served within one.

``assign`` is the one decision: hand idle connections to waiters in their turn, then say for
how many of those left a slot should be asked of the capacity. It counts what is already coming
(connections set aside come back within a round trip, opens and slots asked for are under way)
before it grows, so a checkout waits for its pool's own connection rather than opening one, or
stealing another tenant's at the cap; and while connections are out it grows ``growth_step``
at a time, so a burst the pool clears in milliseconds does not leave it at ``max_size``.
Whichever connection frees first serves whoever is first then: no waiter owns the connection
opened because of it. The one exception to reuse before growth is a lone task checking out in
sequence: two connections, one reset while the other serves, spare it the reset's round trip
on every checkout.

Two facts only the pool's I/O side knows are asked through callables: whether an idle
connection is still usable (the server may have closed it) and whether a waiter still waits
(its task may have been cancelled before the pool hears of it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, TypeVar

from ._settings import SessionState
from ._stats import Counters

__all__ = ["Dispatch", "Plan", "Serve"]

C = TypeVar("C", bound=Hashable)  # a connection
W = TypeVar("W", bound=Hashable)  # a waiting checkout


@dataclass(frozen=True, slots=True)
class Serve(Generic[W, C]):
    """Hand ``conn`` (now in use) to ``waiter``; ``queued``: withdraw it from the capacity."""

    waiter: W
    conn: C
    queued: bool


@dataclass(slots=True)
class Plan(Generic[W, C]):
    """What ``assign`` decided, for the pool to carry out."""

    serve: list[Serve[W, C]] = field(default_factory=list)
    # Waiters found no longer waiting and forgotten, with whether they were queued at the cap.
    gone: list[tuple[W, bool]] = field(default_factory=list)
    # Ask the capacity for a slot for each: a grant is ``granted(w)``, a queue ``queued_at_cap(w)``.
    ask: list[W] = field(default_factory=list)
    # Open a second connection if a slot is free (no queueing, no stealing): see ``_lone``.
    spare: bool = False


class Dispatch(Generic[C, W]):
    """One pool's connections and checkouts. ``counters``, shared by a manager's pools, is
    kept in step with the connections in use and idle and the checkouts waiting."""

    __slots__ = (
        "_by_state",
        "_counters",
        "_growth_step",
        "_turns",
        "_usable",
        "_waiting",
        "aside",
        "closing",
        "dead",
        "idle",
        "in_use",
        "max_size",
        "opening",
        "queued",
        "waiters",
    )

    def __init__(
        self,
        max_size: int,
        counters: Counters,
        *,
        usable: Callable[[C], bool],
        waiting: Callable[[W], bool],
        growth_step: int,
    ) -> None:
        self.max_size = max_size
        self._counters = counters
        self._usable = usable
        self._waiting = waiting
        self._growth_step = growth_step
        # Idle connections in release order, with the state each carries: popitem() gives the
        # most recently used, iteration starts at the least recently used.
        self.idle: dict[C, SessionState] = {}
        self._by_state: dict[SessionState, dict[C, None]] = {}
        # Dicts, not sets, here and below: a service may hold a pool per tenant, mostly idle,
        # and an empty dict is a quarter the size of an empty set.
        self.in_use: dict[C, None] = {}
        self.aside: dict[C, float] = {}  # being reset or pinged, with since when (for a watchdog)
        self.opening = 0
        self.closing = 0
        # Idle connections found unusable, taken out: the pool closes them (and empties this).
        self.dead: list[C] = []
        # Waiting checkouts in arrival order, with the tenant and the state each wants.
        self.waiters: dict[W, tuple[str, SessionState]] = {}
        # The same waiters by tenant, tenants in the order their turn comes: one served goes to
        # the back, so a tenant with one checkout waiting is next after at most one of each
        # other tenant's, however many they have queued.
        self._turns: dict[str, dict[W, None]] = {}
        self.queued: dict[W, None] = {}  # waiters with a request queued at the capacity

    @property
    def size(self) -> int:
        """Every connection: idle, in use, set aside, being opened or closed."""
        return len(self.idle) + len(self.in_use) + len(self.aside) + self.opening + self.closing

    # -- checkouts ---------------------------------------------------------------------------

    def take(self, state: SessionState | None) -> C | None:
        """Check out an idle connection, one carrying ``state`` first, most recent first."""
        while self.idle:
            bucket = self._by_state.get(state) if state is not None else None
            if bucket:
                conn = bucket.popitem()[0]
                del self.idle[conn]
            else:
                conn, carried = self.idle.popitem()
                self._unindex(conn, carried)
            self._counters.idle -= 1
            if not self._usable(conn):
                self.dead.append(conn)
                continue
            self.in_use[conn] = None
            self._counters.in_use += 1
            return conn
        return None

    def wait(self, waiter: W, tenant: str, state: SessionState) -> None:
        self.waiters[waiter] = (tenant, state)
        self._turns.setdefault(tenant, {})[waiter] = None
        self._counters.waiting += 1

    def leave(self, waiter: W) -> bool | None:
        """Forget a waiter (failed, timed out, cancelled): None if it was not waiting, else
        whether it was queued at the capacity (the pool withdraws it there)."""
        if waiter not in self.waiters:
            return None
        return self._forget(waiter, served=False)

    def leave_all(self) -> list[tuple[W, bool]]:
        """Forget every waiter (the target is down, the pool closes)."""
        return [(waiter, self._forget(waiter, served=False)) for waiter in list(self.waiters)]

    def queued_at_cap(self, waiter: W) -> None:
        self.queued[waiter] = None

    def granted(self, waiter: W | None = None) -> None:
        """A slot is held for a new connection (asked for ``waiter``, or for ``min_size``)."""
        if waiter is not None:
            self.queued.pop(waiter, None)
        self.opening += 1

    def fair_order(self, limit: int) -> list[W]:
        """The first ``limit`` waiters in the order they are to be served."""
        if len(self._turns) <= 1:
            return list(islice(self.waiters, limit))
        order: list[W] = []
        lines = [iter(turn) for turn in islice(self._turns.values(), limit)]
        while lines:
            going = []
            for line in lines:
                waiter = next(line, None)
                if waiter is not None:
                    order.append(waiter)
                    if len(order) == limit:
                        return order
                    going.append(line)
            lines = going
        return order

    def next_state(self) -> SessionState | None:
        """The state wanted by the waiter a connection set aside now will likely serve:
        connections come back about in the order they went, each to the first waiter left."""
        ahead = len(self.aside)
        order = self.fair_order(ahead + 1)
        return self.waiters[order[ahead]][1] if len(order) > ahead else None

    def assign(self) -> Plan[W, C]:
        """Serve waiters with idle connections in their turn; then ask for slots for those that
        what is coming (set aside, opening, queued at the capacity) will not serve."""
        plan: Plan[W, C] = Plan()
        while self.idle and self.waiters:
            for waiter in self.fair_order(len(self.idle)):
                if not self._waiting(waiter):
                    plan.gone.append((waiter, self._forget(waiter, served=False)))
                    continue
                conn = self.take(self.waiters[waiter][1])
                if conn is None:
                    break  # the last idle ones were dead
                plan.serve.append(Serve(waiter, conn, self._forget(waiter, served=True)))
        deficit = self._deficit()
        if deficit <= 0:
            plan.spare = self._lone()
            return plan
        for waiter in self.fair_order(len(self.queued) + deficit + 1):
            if len(plan.ask) >= deficit:
                break
            if not self._waiting(waiter):
                plan.gone.append((waiter, self._forget(waiter, served=False)))
                deficit = self._deficit()  # it was counted
            elif waiter not in self.queued:
                plan.ask.append(waiter)
        return plan

    def _lone(self) -> bool:
        """A lone task checking out in sequence finds the pool's one connection still being
        reset from its last scope. A second connection (in a free slot only) lets each of its
        checkouts take the one not being reset, so none waits for a reset's round trip; it
        grows no further, as one connection always comes back while the other is out."""
        return bool(self.waiters) and self.size == 1 == len(self.aside) and self.max_size > 1

    def _deficit(self) -> int:
        """How many waiters nothing under way will serve: a slot is to be asked for each."""
        queued = len(self.queued)
        deficit = len(self.waiters) - len(self.aside) - self.opening - queued
        if self.in_use or self.aside:
            # Connections are out and come back within a query or two: grow a step at a time.
            deficit = min(deficit, self._growth_step - self.opening - queued)
        return min(deficit, self.max_size - self.size - queued)

    def _forget(self, waiter: W, *, served: bool) -> bool:
        tenant = self.waiters.pop(waiter)[0]
        self._counters.waiting -= 1
        turn = self._turns[tenant]
        del turn[waiter]
        if not turn:
            del self._turns[tenant]
        elif served:
            self._turns[tenant] = self._turns.pop(tenant)  # to the back of the line
        return self.queued.pop(waiter, False) is None

    # -- connections -------------------------------------------------------------------------

    def give_back(self, conn: C) -> bool:
        """A connection in use comes back (the pool then closes it, resets it or files it)."""
        if self.in_use.pop(conn, False) is not None:
            return False
        self._counters.in_use -= 1
        return True

    def set_aside(self, conn: C, since: float) -> None:
        self.aside[conn] = since

    def back(self, conn: C) -> None:
        """Its reset or ping is over (the pool then files it idle or closes it)."""
        del self.aside[conn]

    def file_idle(self, conn: C, state: SessionState) -> None:
        self.idle[conn] = state
        self._counters.idle += 1
        self._by_state.setdefault(state, {})[conn] = None

    def remove_idle(self, conn: C) -> None:
        """Take an idle connection out (stolen, reaped, recycled, pinged, closed)."""
        self._unindex(conn, self.idle.pop(conn))
        self._counters.idle -= 1

    def opened(self) -> None:
        """An open ended, with a connection (the pool then files it) or without."""
        self.opening -= 1

    def closing_started(self) -> None:
        self.closing += 1

    def closing_done(self) -> None:
        self.closing -= 1

    def _unindex(self, conn: C, state: SessionState) -> None:
        bucket = self._by_state[state]
        del bucket[conn]
        if not bucket:
            del self._by_state[state]
