"""Reconnect backoff: jittered exponential delays, fail-fast rejection and a single-flight probe."""

from __future__ import annotations

import itertools
import random
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tenantpool._backoff import Admission, Backoff

FIRST, CAP, FACTOR = 0.1, 30.0, 2.0


def always(value: float) -> Backoff:
    return Backoff(first=FIRST, cap=CAP, factor=FACTOR, rng=lambda: value)


def fail_rounds(backoff: Backoff, rounds: int, now: float = 0.0) -> list[float]:
    """Fail ``rounds`` times in a row, each as the probe of the previous round."""
    delays = [backoff.failed(now)]
    for _ in range(rounds - 1):
        now += delays[-1]
        assert backoff.admit(now) is Admission.PROBE
        delays.append(backoff.failed(now))
    return delays


# --- delays -------------------------------------------------------------------------------------


def test_max_draws_are_exactly_exponential_then_capped() -> None:
    delays = fail_rounds(always(1.0), 12)
    expected = [min(CAP, FIRST * FACTOR**n) for n in range(12)]
    assert delays == pytest.approx(expected)
    assert delays[-1] == CAP


def test_zero_draws_hold_the_floor() -> None:
    backoff = always(0.0)
    assert fail_rounds(backoff, 8) == pytest.approx([backoff.floor] * 8)
    assert backoff.floor == pytest.approx(FIRST / 10)


def test_out_of_range_draws_are_clamped() -> None:
    assert always(7.0).failed(0.0) == pytest.approx(FIRST)
    assert always(-3.0).failed(0.0) == pytest.approx(FIRST / 10)


@given(failures=st.integers(min_value=1, max_value=40), draw=st.floats(0.0, 1.0))
@settings(max_examples=100, deadline=None)
def test_delay_stays_within_floor_and_bound(failures: int, draw: float) -> None:
    backoff = always(draw)
    bound = backoff.bound(failures)
    assert backoff.floor <= bound <= CAP
    delay = fail_rounds(backoff, failures)[-1]
    assert backoff.failures == failures
    assert backoff.floor <= delay <= bound


def test_bound_survives_overflow() -> None:
    assert always(1.0).bound(10**6) == CAP
    assert Backoff(first=1.0, cap=5.0, factor=1.0).bound(10**6) == 1.0


def test_full_jitter_spreads_over_the_window() -> None:
    rng = random.Random(1234)
    for failures in (1, 4, 9):
        bound = min(CAP, FIRST * FACTOR ** (failures - 1))
        delays = []
        for _ in range(2000):
            backoff = Backoff(first=FIRST, cap=CAP, factor=FACTOR, rng=rng.random)
            delays.append(fail_rounds(backoff, failures)[-1])
        floor = FIRST / 10
        assert floor <= min(delays) < 0.2 * bound
        assert 0.8 * bound < max(delays) <= bound
        # Uniform over [floor, bound]: the mean sits near the middle.
        assert statistics.fmean(delays) == pytest.approx((floor + bound) / 2, rel=0.1)


def test_delays_grow_exponentially_in_expectation() -> None:
    rng = random.Random(99)
    means = []
    for failures in range(1, 8):
        runs = [
            fail_rounds(Backoff(first=FIRST, cap=CAP, factor=FACTOR, rng=rng.random), failures)[-1]
            for _ in range(1000)
        ]
        means.append(statistics.fmean(runs))
    ratios = [later / earlier for earlier, later in itertools.pairwise(means)]
    assert all(1.6 < ratio < 2.4 for ratio in ratios), ratios


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first": 0.0},
        {"first": -1.0},
        {"first": float("inf")},
        {"first": float("nan")},
        {"cap": 0.05},
        {"cap": float("inf")},
        {"factor": 0.5},
        {"factor": float("nan")},
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# --- admission ----------------------------------------------------------------------------------


def test_healthy_admits_everyone() -> None:
    backoff = always(0.5)
    assert [backoff.admit(t) for t in range(5)] == [Admission.OPEN] * 5
    assert not backoff.backing_off
    assert backoff.failures == 0
    assert backoff.since is None
    assert backoff.retry_after(3.0) == 0.0
    assert repr(backoff) == "<Backoff healthy>"


def test_rejects_while_waiting_with_retry_after_counting_down() -> None:
    backoff = always(1.0)
    delay = backoff.failed(100.0)
    assert delay == pytest.approx(FIRST)
    assert backoff.backing_off
    assert backoff.since == 100.0
    hints = []
    for step in range(10):
        now = 100.0 + step * FIRST / 10
        assert backoff.admit(now) is Admission.REJECT
        hints.append(backoff.retry_after(now))
    assert hints == sorted(hints, reverse=True)
    assert all(hint > 0 for hint in hints)
    assert backoff.retry_after(100.0 + FIRST) == 0.0
    assert backoff.retry_after(1000.0) == 0.0


def test_exactly_one_probe_once_the_time_has_come() -> None:
    backoff = always(1.0)
    backoff.failed(0.0)
    verdicts = [backoff.admit(FIRST) for _ in range(50)]
    assert verdicts.count(Admission.PROBE) == 1
    assert verdicts[0] is Admission.PROBE
    assert backoff.probing
    # Later still, the probe has not reported: everyone else is still turned away, with a hint.
    assert backoff.admit(FIRST + 100) is Admission.REJECT
    assert backoff.retry_after(FIRST + 100) == FIRST
    assert "probe in flight" in repr(backoff)


def test_probe_success_reopens_for_everyone() -> None:
    backoff = always(1.0)
    fail_rounds(backoff, 3)
    assert backoff.admit(100.0) is Admission.PROBE
    backoff.succeeded()
    assert [backoff.admit(100.0) for _ in range(10)] == [Admission.OPEN] * 10
    assert backoff.failures == 0
    assert not backoff.backing_off
    assert not backoff.probing
    assert backoff.since is None
    # The next outage starts over from the first delay.
    assert backoff.failed(200.0) == pytest.approx(FIRST)
    assert backoff.since == 200.0


def test_probe_failure_backs_off_again_with_a_longer_bound() -> None:
    backoff = always(1.0)
    first_delay = backoff.failed(0.0)
    assert backoff.admit(first_delay) is Admission.PROBE
    second_delay = backoff.failed(first_delay)
    assert second_delay == pytest.approx(FIRST * FACTOR)
    assert backoff.failures == 2
    assert backoff.since == 0.0  # still the same outage
    assert not backoff.probing
    assert backoff.admit(first_delay) is Admission.REJECT
    assert backoff.retry_after(first_delay) == pytest.approx(second_delay)
    assert backoff.admit(first_delay + second_delay) is Admission.PROBE
    backoff.failed(1.0)
    assert repr(backoff) == "<Backoff backing off: 3 failures, delay 0.40s>"


def test_abandoned_probe_hands_over_to_the_next_caller() -> None:
    backoff = always(1.0)
    backoff.failed(0.0)
    assert backoff.admit(1.0) is Admission.PROBE
    assert backoff.admit(1.0) is Admission.REJECT
    backoff.probe_abandoned()
    assert not backoff.probing
    assert backoff.failures == 1  # abandoning is not a failure
    assert backoff.admit(1.0) is Admission.PROBE
    assert backoff.admit(1.0) is Admission.REJECT
    backoff.probe_abandoned()
    backoff.probe_abandoned()  # idempotent
    assert backoff.admit(1.0) is Admission.PROBE


def test_stragglers_from_before_the_outage_count_once_per_round() -> None:
    backoff = always(1.0)
    # Five connects admitted while healthy all fail: only the first starts the outage.
    delays = [backoff.failed(10.0 + i * 0.01) for i in range(5)]
    assert backoff.failures == 1
    assert delays[0] == pytest.approx(FIRST)
    assert delays[1:] == pytest.approx([FIRST - i * 0.01 for i in range(1, 5)])
    assert backoff.admit(10.0 + FIRST) is Admission.PROBE
    # A success from any connect still ends the outage.
    backoff.succeeded()
    assert backoff.admit(10.2) is Admission.OPEN


def test_targets_are_independent() -> None:
    down, up = always(1.0), always(1.0)
    fail_rounds(down, 5)
    assert down.admit(0.0) is Admission.REJECT
    assert up.admit(0.0) is Admission.OPEN
    assert up.retry_after(0.0) == 0.0
    assert up.failures == 0
    up.failed(0.0)
    assert up.failures == 1
    assert down.failures == 5


def test_hurry_brings_a_long_wait_forward_within_the_window() -> None:
    backoff = always(1.0)
    delays = fail_rounds(backoff, 6)  # the last delay drawn is the bound, 3.2 s
    now = sum(delays[:-1]) + 0.1  # just after the last failure
    assert backoff.retry_after(now) == pytest.approx(3.1)
    assert backoff.hurry(now, within=0.5)
    assert backoff.retry_after(now) == pytest.approx(0.5)  # the top draw of the window
    assert backoff.failures == 6  # still the same outage, only sooner
    assert not backoff.hurry(now, within=0.01)  # once a round: no second draw
    assert backoff.admit(now + 0.5) is Admission.PROBE
    backoff.failed(now + 0.5)  # the next round may be hurried again
    assert backoff.hurry(now + 0.6, within=0.5)


def test_hurry_spreads_targets_over_the_window_and_spares_probes_and_the_healthy() -> None:
    rng = random.Random(7)

    def cut_off() -> tuple[Backoff, float]:
        """A target 8 rounds into an outage (top draws), then drawing at random."""
        draws = itertools.chain([1.0] * 8, iter(rng.random, None))
        backoff = Backoff(first=FIRST, cap=CAP, rng=draws.__next__)
        return backoff, sum(fail_rounds(backoff, 8)[:-1])

    cut = [cut_off() for _ in range(200)]
    targets = [backoff for backoff, _ in cut]
    now = cut[0][1] + 0.01  # just after everyone's last failure
    assert min(b.retry_after(now) for b in targets) > 10
    for backoff in targets:
        backoff.hurry(now, within=1.0)
    waits = [b.retry_after(now) for b in targets]
    assert all(FIRST / 10 <= w <= 1.0 for w in waits)
    assert statistics.pstdev(waits) > 0.2  # spread, not a herd
    healthy, probing = always(1.0), always(1.0)
    probing.failed(0.0)
    assert probing.admit(1.0) is Admission.PROBE
    assert not healthy.hurry(now, 1.0) and healthy.admit(now) is Admission.OPEN
    assert not probing.hurry(1.0, 1.0) and probing.probing


# --- random sequences ---------------------------------------------------------------------------


class BackoffMachine(RuleBasedStateMachine):
    """Drives one Backoff through arbitrary interleavings, against a tiny model of it."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.backoff = Backoff(first=0.05, cap=2.0, factor=3.0, rng=self.rng.random)
        self.now = 1000.0
        self.probes_in_flight = 0
        self.failures = 0
        self.hurried = False

    @rule(seconds=st.floats(min_value=0.0, max_value=5.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(callers=st.integers(min_value=1, max_value=4))
    def admit(self, callers: int) -> None:
        for _ in range(callers):
            verdict = self.backoff.admit(self.now)
            if self.failures == 0:
                assert verdict is Admission.OPEN
            else:
                assert verdict is not Admission.OPEN
            if verdict is Admission.PROBE:
                assert self.probes_in_flight == 0
                self.probes_in_flight += 1
            if verdict is Admission.REJECT:
                assert self.backoff.retry_after(self.now) > 0

    @rule()
    def fail(self) -> None:
        counted = self.failures == 0 or self.probes_in_flight > 0
        before = self.backoff.retry_after(self.now)
        result = self.backoff.failed(self.now)
        if counted:
            self.failures += 1
            self.probes_in_flight = 0
            self.hurried = False
            bound = self.backoff.bound(self.failures)
            assert self.backoff.floor <= result <= bound
        else:
            assert result == before
        # The same wait either way, up to rounding in (now + delay) - now.
        assert result == pytest.approx(self.backoff.retry_after(self.now), abs=1e-9)

    @rule()
    def succeed(self) -> None:
        self.backoff.succeeded()
        self.failures = 0
        self.probes_in_flight = 0
        self.hurried = False

    @rule(within=st.floats(min_value=0.0, max_value=3.0))
    def hurry(self, within: float) -> None:
        before = self.backoff.retry_after(self.now)
        moved = self.backoff.hurry(self.now, within)
        after = self.backoff.retry_after(self.now)
        if self.failures == 0 or self.probes_in_flight or self.hurried:
            assert not moved and after == before
        elif moved:
            self.hurried = True
            assert after < before  # never later
            assert after <= max(within, self.backoff.floor) + 1e-9
        else:
            assert after == before <= max(within, self.backoff.floor)

    @precondition(lambda self: self.probes_in_flight > 0)
    @rule()
    def abandon_probe(self) -> None:
        self.backoff.probe_abandoned()
        self.probes_in_flight = 0
        assert self.backoff.admit(self.now) is Admission.PROBE
        self.probes_in_flight = 1

    @invariant()
    def matches_the_model(self) -> None:
        assert self.backoff.failures == self.failures
        assert self.backoff.backing_off == (self.failures > 0)
        assert self.backoff.probing == (self.probes_in_flight == 1)
        assert self.probes_in_flight <= 1
        assert (self.backoff.since is None) == (self.failures == 0)
        assert self.backoff.retry_after(self.now) >= 0
        assert self.backoff.retry_after(self.now) <= self.backoff.cap
        assert repr(self.backoff).startswith("<Backoff ")


BackoffMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBackoffMachine = BackoffMachine.TestCase
