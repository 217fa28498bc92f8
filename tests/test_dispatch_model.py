"""One pool's dispatch as a pure state machine, alone, driven the way the pool drives it.

A hypothesis state machine plays the pool's I/O side (opens, resets, closes finishing in any
order, checkouts arriving, cancelled and timing out, idle connections dying, other pools taking
and freeing slots of the cap) and checks after every step: the counts agree, no connection has
two holders, the cap holds over opening + closing connections, nobody waits while an idle
connection exists, nothing is left undecided, and waiters are served round robin across tenants,
first come first served within one.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tenantpool._capacity import Capacity, Grant, Steal
from tenantpool._dispatch import Dispatch
from tenantpool._settings import SessionState
from tenantpool._stats import Counters

TENANTS = ("a", "b", "c")
MAX_SIZE = 4
STEP = 2


def state_of(tenant: str) -> SessionState:
    return (("app.tenant", tenant),)


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counters = Counters()
        self.dead: set[int] = set()  # connections the server closed (not known to be gone)
        self.finished: set[str] = set()  # waiters whose future is done: served, failed, cancelled
        self.dispatch: Dispatch[int, str] = Dispatch(
            MAX_SIZE,
            self.counters,
            usable=lambda conn: conn not in self.dead,
            waiting=lambda waiter: waiter not in self.finished,
            growth_step=STEP,
        )
        self.cap: Capacity[str, int, str] = Capacity(3, lambda pool: True)
        self.other_slots = 0  # slots of the cap held by another pool
        self.names = itertools.count()
        self.conns = itertools.count()
        self.tenant: dict[str, str] = {}
        self.arrival: dict[str, int] = {}
        self.holder: dict[int, str] = {}  # connection in use -> the checkout holding it
        self.state: dict[int, SessionState] = {}  # what each connection carries
        # For round robin: tenants served since each waiting tenant was last served.
        self.served_since: dict[str, set[str]] = {}

    # -- the pool's side: what it does with the dispatch's decisions --------------------------

    def live_waiters(self, tenant: str | None = None) -> list[str]:
        return [
            w
            for w in self.dispatch.waiters
            if w not in self.finished and (tenant is None or self.tenant[w] == tenant)
        ]

    def hand_over(self, waiter: str, conn: int) -> None:
        assert conn not in self.holder, "a connection handed to two checkouts"
        assert waiter not in self.finished
        tenant = self.tenant[waiter]
        # First come first served within a tenant.
        earlier = [w for w in self.live_waiters(tenant) if self.arrival[w] < self.arrival[waiter]]
        assert not earlier, f"{waiter} served before {earlier}"
        # Round robin: no tenant is served twice while another waits through both turns.
        for other, since in self.served_since.items():
            if other != tenant and self.live_waiters(other):
                assert tenant not in since, f"{tenant} served twice while {other} waited"
                since.add(tenant)
        self.served_since[tenant] = set()
        self.state[conn] = state_of(tenant)
        self.holder[conn] = waiter
        self.finished.add(waiter)

    def bury(self) -> None:
        dead, self.dispatch.dead = self.dispatch.dead, []
        for conn in dead:
            self.cap.not_idle(conn)
            self.dispatch.closing_started()

    def carry_out(self, decision: Grant[str] | Steal[str, int, str] | None) -> None:
        assert not isinstance(decision, Steal), "one pool: nothing of another to steal"
        if decision is not None:
            if decision.request in self.finished:
                self.dispatch.leave(decision.request)
                self.carry_out(self.cap.closed())
            else:
                self.dispatch.granted(decision.request)

    def serve(self) -> None:
        """The pool's _serve_waiters: carry out the plan until there is none."""
        while True:
            plan = self.dispatch.assign()
            self.bury()
            for waiter, queued in plan.gone:
                assert waiter in self.finished, "a live waiter forgotten"
                if queued:
                    self.cap.withdraw(waiter)
            for serve in plan.serve:
                if serve.queued:
                    self.cap.withdraw(serve.waiter)
                self.cap.not_idle(serve.conn)
                self.hand_over(serve.waiter, serve.conn)
            for waiter in plan.ask:
                self.check_growth()
                decision = self.cap.request(waiter, "p")
                if decision is None:
                    self.dispatch.queued_at_cap(waiter)
                else:
                    self.carry_out(decision)
            if plan.spare:
                # A lone task's second connection: only while its one connection is being
                # reset and a checkout waits for it, and only in a free slot.
                d = self.dispatch
                assert d.size == len(d.aside) == 1 and d.waiters and not plan.ask
                if self.cap.take():
                    d.granted()
            if not plan.serve and not plan.gone and not plan.ask:
                return

    def check_growth(self) -> None:
        """Before a slot is asked for: reuse before growth. A pool never grows for waiters
        that its connections set aside, opening or queued for will serve, and while its
        connections are out grows a step at a time; never past max_size."""
        d = self.dispatch
        asked = d.opening + len(d.queued)
        assert len(d.waiters) > len(d.aside) + asked
        if d.in_use or d.aside:
            assert asked < STEP
        assert d.size + len(d.queued) < MAX_SIZE

    def file(self, conn: int) -> None:
        self.dispatch.file_idle(conn, self.state[conn])
        self.serve()
        if conn in self.dispatch.idle:
            assert self.cap.became_idle(conn, "p") is None

    def slot_freed(self) -> None:
        self.carry_out(self.cap.closed())
        self.serve()

    # -- events ------------------------------------------------------------------------------

    @rule(tenant=st.sampled_from(TENANTS))
    def checkout(self, tenant: str) -> None:
        waiter = f"w{next(self.names)}"
        self.tenant[waiter] = tenant
        self.arrival[waiter] = len(self.arrival)
        if not self.dispatch.waiters:
            conn = self.dispatch.take(state_of(tenant))
            self.bury()
            if conn is not None:
                self.cap.not_idle(conn)
                self.state[conn] = state_of(tenant)
                self.holder[conn] = waiter
                self.finished.add(waiter)
                return
        if not self.live_waiters(tenant):  # a new line: it has waited through no turn yet
            self.served_since[tenant] = set()
        self.dispatch.wait(waiter, tenant, state_of(tenant))
        self.serve()

    @precondition(lambda self: self.live_waiters())
    @rule(data=st.data(), timed_out=st.booleans())
    def give_up(self, data: st.DataObject, timed_out: bool) -> None:
        """Cancelled (the pool hears of it later, or now) or timed out (it hears at once)."""
        waiter = data.draw(st.sampled_from(self.live_waiters()))
        self.finished.add(waiter)
        if timed_out:
            self.leave(waiter)

    @precondition(lambda self: any(w in self.finished for w in self.dispatch.waiters))
    @rule(data=st.data())
    def cancelled_task_runs(self, data: st.DataObject) -> None:
        gone = [w for w in self.dispatch.waiters if w in self.finished]
        self.leave(data.draw(st.sampled_from(gone)))

    def leave(self, waiter: str) -> None:
        queued = self.dispatch.leave(waiter)
        if queued:
            self.cap.withdraw(waiter)
        self.serve()

    @precondition(lambda self: self.holder)
    @rule(data=st.data(), dirty=st.booleans(), broken=st.booleans())
    def release(self, data: st.DataObject, dirty: bool, broken: bool) -> None:
        conn = data.draw(st.sampled_from(sorted(self.holder)))
        holder = self.holder.pop(conn)
        assert self.dispatch.give_back(conn)
        assert not self.dispatch.give_back(conn)
        if broken:
            self.dispatch.closing_started()
            self.serve()
        elif dirty:
            self.dispatch.set_aside(conn, 0.0)
            wanted = self.dispatch.next_state()
            if wanted is not None:
                self.state[conn] = wanted
        else:
            self.state[conn] = state_of(self.tenant[holder])  # clean: it keeps the holder's
            self.file(conn)

    @precondition(lambda self: self.dispatch.aside)
    @rule(data=st.data(), ok=st.booleans())
    def reset_done(self, data: st.DataObject, ok: bool) -> None:
        conn = data.draw(st.sampled_from(sorted(self.dispatch.aside)))
        self.dispatch.back(conn)
        if ok:
            self.file(conn)
        else:
            self.dispatch.closing_started()
            self.serve()

    @precondition(lambda self: self.dispatch.opening)
    @rule(ok=st.booleans())
    def open_done(self, ok: bool) -> None:
        self.dispatch.opened()
        if ok:
            conn = next(self.conns)
            self.state[conn] = ()
            self.file(conn)
        else:
            self.slot_freed()

    @precondition(lambda self: self.dispatch.closing)
    @rule()
    def close_done(self) -> None:
        self.dispatch.closing_done()
        self.slot_freed()

    @precondition(lambda self: any(c not in self.dead for c in self.dispatch.idle))
    @rule(data=st.data())
    def server_kills_idle(self, data: st.DataObject) -> None:
        alive = sorted(c for c in self.dispatch.idle if c not in self.dead)
        self.dead.add(data.draw(st.sampled_from(alive)))

    @precondition(lambda self: self.dispatch.idle)
    @rule(data=st.data())
    def reaped(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.dispatch.idle)))
        self.dispatch.remove_idle(conn)
        self.cap.not_idle(conn)
        self.dispatch.closing_started()

    @rule()
    def refill(self) -> None:
        if self.dispatch.size < 1 and self.cap.take():
            self.dispatch.granted()

    @rule()
    def other_pool_takes_a_slot(self) -> None:
        if self.cap.take():
            self.other_slots += 1

    @precondition(lambda self: self.other_slots)
    @rule()
    def other_pool_frees_a_slot(self) -> None:
        self.other_slots -= 1
        self.slot_freed()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        d = self.dispatch
        assert self.counters.in_use == len(d.in_use) == len(self.holder)
        assert set(d.in_use) == set(self.holder)
        assert self.counters.idle == len(d.idle)
        assert self.counters.waiting == len(d.waiters)
        assert not (d.idle.keys() & d.in_use) and not (d.idle.keys() & d.aside.keys())
        assert not (d.in_use.keys() & d.aside.keys())
        assert d.queued.keys() <= d.waiters.keys()

    @invariant()
    def the_cap_holds(self) -> None:
        d = self.dispatch
        assert self.cap.total == d.size + self.other_slots <= 3
        assert d.size + len(d.queued) <= MAX_SIZE

    @invariant()
    def nobody_waits_beside_an_idle_connection(self) -> None:
        assert not (self.dispatch.idle and self.dispatch.waiters)

    @invariant()
    def nothing_left_undecided(self) -> None:
        """Every waiter is covered by something coming (a connection set aside, an open, a
        slot asked for), up to max_size and, while connections are out, the growth step; and
        a pool never grows for waiters its own resets in flight will serve."""
        d = self.dispatch
        coming = len(d.aside) + d.opening + len(d.queued)
        need = len(d.waiters) - coming
        if d.in_use or d.aside:
            need = min(need, STEP - d.opening - len(d.queued))
        assert min(need, MAX_SIZE - d.size - len(d.queued)) <= 0


PoolModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_dispatch_model = PoolModel.TestCase
