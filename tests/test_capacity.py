"""The cap's pure state machine, alone: the cap holds, the queue is FIFO, nobody starves."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tenantpool._capacity import Capacity, Grant, Steal

POOLS = ("a", "b", "c")
MIN_SIZE = {"a": 0, "b": 1, "c": 2}


class Model:
    """The pools' side: which connections exist, in which state, per pool."""

    def __init__(self) -> None:
        self.in_use: dict[int, str] = {}
        self.idle: dict[int, str] = {}
        self.opening: dict[str, str] = {}  # request -> pool, holding a granted slot
        self.closing: dict[str, str] = {}  # request -> pool, waiting for a stolen close
        self.queued: list[tuple[str, str]] = []

    def size(self, pool: str) -> int:
        return sum(
            1
            for owner in itertools.chain(
                self.in_use.values(), self.idle.values(), self.opening.values()
            )
            if owner == pool
        )


def test_grants_until_the_cap_then_steals_lru_above_min_first() -> None:
    model = Model()
    cap: Capacity[str, int, str] = Capacity(3, lambda p: model.size(p) > MIN_SIZE[p])
    assert cap.request("r1", "a") == Grant("r1")
    assert cap.request("r2", "b") == Grant("r2")
    assert cap.request("r3", "b") == Grant("r3")
    assert cap.total == 3
    model.idle.update({1: "a", 2: "b", 3: "b"})
    for conn, pool in model.idle.items():
        assert cap.became_idle(conn, pool) is None
    # c needs one: b holds 2 > min 1 and a holds 1 > min 0; conn 1 (a) is the LRU.
    assert cap.request("r4", "c") == Steal("r4", "a", 1)
    del model.idle[1]
    # a is at its min now (0 < 1 is false... a holds 0): next LRU above min is b's conn 2.
    assert cap.request("r5", "c") == Steal("r5", "b", 2)
    del model.idle[2]
    # b holds 1 == min: below-min connections are still taken when nothing else is idle.
    assert cap.request("r6", "a") == Steal("r6", "b", 3)
    assert cap.total == 3  # slots pass from victim to stealer, never added


def test_queue_is_first_come_first_served_across_pools() -> None:
    cap: Capacity[str, int, str] = Capacity(1, lambda p: True)
    assert cap.request("first", "a") == Grant("first")
    assert cap.request("r1", "b") is None
    assert cap.request("r2", "c") is None
    assert cap.request("r3", "b") is None
    assert cap.waiting == 3
    assert cap.withdraw("r2") is True
    assert cap.withdraw("r2") is False
    assert cap.closed() == Grant("r1")
    assert cap.closed() == Grant("r3")
    assert cap.closed() is None
    assert cap.total == 0


def test_an_idle_connection_is_stolen_at_once_for_a_queued_request_of_another_pool() -> None:
    cap: Capacity[str, int, str] = Capacity(1, lambda p: True)
    assert cap.request("r0", "a") == Grant("r0")
    assert cap.request("r1", "a") is None  # same pool: its own release serves it
    assert cap.request("r2", "b") is None
    assert cap.became_idle(10, "a") == Steal("r2", "a", 10)
    assert cap.waiting == 1 and cap.idle == 0


def test_a_pool_over_its_fair_share_passes_one_release_in_limit_plus_one_on() -> None:
    sizes = {"a": 2, "b": 0}
    cap: Capacity[str, int, str] = Capacity(2, lambda p: True, sizes.__getitem__)
    assert cap.request("a1", "a") == Grant("a1")
    assert cap.request("a2", "a") == Grant("a2")
    assert cap.request("b1", "b") is None
    # a holds 2 of a cap of 2 shared with b: over its share of 1. It keeps two releases for
    # its own waiters, then the third goes to b.
    assert cap.pass_on(10, "a") is None
    assert cap.pass_on(11, "a") is None
    assert cap.pass_on(12, "a") == Steal("b1", "a", 12)
    assert cap.waiting == 0
    sizes.update(a=1, b=1)
    assert cap.request("b2", "b") is None
    # Within its share a pool keeps what it gets back: no churn once shares have settled.
    for conn in range(20, 30):
        assert cap.pass_on(conn, "a") is None
    assert cap.withdraw("b2")


def test_withdrawing_from_a_long_queue_is_constant_time() -> None:
    cap: Capacity[str, int, str] = Capacity(1, lambda p: True)
    assert cap.request("first", "a") == Grant("first")
    for n in range(10_000):
        assert cap.request(f"r{n}", "b") is None
    for n in range(0, 10_000, 2):
        assert cap.withdraw(f"r{n}")
    assert cap.waiting == 5_000
    assert cap.closed() == Grant("r1")
    assert cap.became_idle(1, "a") == Steal("r3", "a", 1)


def test_no_cap_always_grants() -> None:
    cap: Capacity[str, int, str] = Capacity(None, lambda p: True)
    for i in range(1000):
        assert cap.request(f"r{i}", "a") == Grant(f"r{i}")
    assert not cap.saturated and cap.total == 1000


def test_bad_limit_and_double_queueing_are_errors() -> None:
    with pytest.raises(ValueError):
        Capacity(0, lambda p: True)
    cap: Capacity[str, int, str] = Capacity(1, lambda p: True)
    cap.request("r0", "a")
    cap.request("r1", "b")
    with pytest.raises(ValueError):
        cap.request("r1", "b")


class CapacityMachine(RuleBasedStateMachine):
    """Random interleavings of requests, opens, releases, closes, steals and withdrawals."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 4
        self.model = Model()
        self.cap: Capacity[str, int, str] = Capacity(
            self.limit, lambda p: self.model.size(p) > MIN_SIZE[p], self.model.size
        )
        self.kept = 0  # releases kept by a pool over its share while others were queued
        # Idle connections a pool within its fair share kept from a queued request: allowed
        # to stay idle until the next tick lends them out.
        self.kept_idle: set[int] = set()
        self.ids = itertools.count()

    def apply(self, decision: Grant[str] | Steal[str, int, str] | None) -> None:
        m = self.model
        if isinstance(decision, Grant):
            m.opening[decision.request] = self.pool_of(decision.request)
        elif isinstance(decision, Steal):
            assert m.idle.pop(decision.conn) == decision.pool
            m.closing[decision.request] = self.pool_of(decision.request)

    def pool_of(self, request: str) -> str:
        return request.split(":")[0]

    @rule(pool=st.sampled_from(POOLS))
    def request(self, pool: str) -> None:
        m = self.model
        own_idle = [c for c, p in m.idle.items() if p == pool]
        if own_idle:  # the pool hands out its own idle connection: no new slot needed
            conn = own_idle[-1]
            del m.idle[conn]
            self.cap.not_idle(conn)
            m.in_use[conn] = pool
            return
        request = f"{pool}:{next(self.ids)}"
        decision = self.cap.request(request, pool)
        if decision is None:
            if not m.queued:  # it could have stolen: only fair shares may have kept it back
                for conn, owner in m.idle.items():
                    assert owner == pool or self.keeps(owner, pool), "a stealable idle conn"
                    self.kept_idle.add(conn)
            m.queued.append((request, pool))
        else:
            self.apply(decision)

    @rule(pool=st.sampled_from(POOLS))
    def refill(self, pool: str) -> None:
        m = self.model
        expected = not m.queued and self.cap.total < self.limit
        assert self.cap.take() == expected, "a refill takes only a free slot nobody waits for"
        if expected:
            m.opening[f"{pool}:refill{next(self.ids)}"] = pool

    @precondition(lambda self: self.model.opening)
    @rule(data=st.data(), succeed=st.booleans())
    def finish_open(self, data: st.DataObject, succeed: bool) -> None:
        m = self.model
        request = data.draw(st.sampled_from(sorted(m.opening)))
        pool = m.opening.pop(request)
        if succeed:
            m.in_use[next(self.ids)] = pool
        else:
            self.served_from_queue(self.cap.closed())

    @precondition(lambda self: self.model.closing)
    @rule(data=st.data())
    def finish_steal(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(sorted(self.model.closing)))
        self.model.opening[request] = self.model.closing.pop(request)

    @precondition(lambda self: self.model.in_use)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        m = self.model
        conn = data.draw(st.sampled_from(sorted(m.in_use)))
        # Still counted as the pool's while it decides, as the pool counts it.
        pool = m.in_use[conn]
        mine = [entry for entry in m.queued if entry[1] == pool]
        if mine:
            others = {p for _, p in m.queued if p != pool}
            over_share = bool(others) and m.size(pool) * (len(others) + 1) > self.limit
            passed = self.cap.pass_on(conn, pool)
            if passed is not None:
                assert over_share, "only a pool over its fair share passes a release on"
                expected = next(entry for entry in m.queued if entry[1] != pool)
                assert passed.request == expected[0], "it goes to the first of another pool"
                del m.in_use[conn]
                m.queued.remove(expected)
                m.closing[passed.request] = expected[1]
                self.kept = 0
                return
            if over_share:
                self.kept += 1
                assert self.kept <= self.limit, "another pool's request waited too long"
            # The pool's own waiter takes it directly, leaving the cap's queue.
            request, _ = mine[0]
            m.queued.remove(mine[0])
            assert self.cap.withdraw(request)
            return
        del m.in_use[conn]
        m.idle[conn] = pool  # counted as the pool's while the capacity decides
        eligible = [e for e in m.queued if e[1] != pool and not self.keeps(pool, e[1])]
        decision = self.cap.became_idle(conn, pool)
        if decision is None:
            assert not eligible, "a request another pool's idle conn could serve was left"
            if any(e[1] != pool for e in m.queued):
                self.kept_idle.add(conn)
        else:
            assert decision.request == eligible[0][0], "steal must serve the first eligible"
            del m.idle[conn]
            m.queued.remove(eligible[0])
            m.closing[decision.request] = eligible[0][1]

    @precondition(lambda self: self.model.in_use or self.model.idle)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        m = self.model
        conns = sorted(m.in_use) + sorted(m.idle)
        conn = data.draw(st.sampled_from(conns))
        if conn in m.idle:
            del m.idle[conn]
            self.cap.not_idle(conn)
        else:
            del m.in_use[conn]
        self.served_from_queue(self.cap.closed())

    @precondition(lambda self: self.model.queued)
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.model.queued))
        self.model.queued.remove(entry)
        assert self.cap.withdraw(entry[0])

    def served_from_queue(self, decision: Grant[str] | None) -> None:
        if decision is None:
            assert not self.model.queued
            return
        head = self.model.queued.pop(0)
        assert decision.request == head[0], "a freed slot must go to the head of the queue"
        self.model.opening[head[0]] = head[1]

    @invariant()
    def cap_holds_and_counts_agree(self) -> None:
        m = self.model
        held = len(m.in_use) + len(m.idle) + len(m.opening) + len(m.closing)
        assert self.cap.total == held <= self.limit
        assert self.cap.waiting == len(m.queued)
        assert self.cap.idle == len(m.idle)

    def keeps(self, pool: str, requester: str) -> bool:
        """The fair-share rule, from the model's side: ``pool`` within its share keeps its
        idle connections from ``requester`` at or over its own."""
        competing = len({p for _, p in self.model.queued} | {pool, requester})
        size = self.model.size
        return size(pool) * competing <= self.limit <= size(requester) * competing

    @rule()
    def tick(self) -> None:
        """The background task lends out what fair shares kept back."""
        for steal in self.cap.offer():
            self.apply(steal)
            entry = next(e for e in self.model.queued if e[0] == steal.request)
            self.model.queued.remove(entry)
            assert steal.pool != entry[1]
        for _, pool in self.model.queued:
            assert all(p == pool for p in self.model.idle.values()), "offer left one idle"
        self.kept_idle.clear()

    @invariant()
    def nobody_waits_while_capacity_is_free(self) -> None:
        m = self.model
        if m.queued:
            assert self.cap.saturated
            for _, pool in m.queued:
                for conn, owner in m.idle.items():
                    assert owner == pool or conn in self.kept_idle, "a stealable idle conn"


TestCapacityMachine = CapacityMachine.TestCase
TestCapacityMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
