"""Per-target reconnect backoff: when a server is down, fail fast and let one probe find it back.

Without this, every checkout for a target whose server refuses connections would open its own
connect and wait out its own timeout, so a dead server turns into a pile of hung requests and a
burst of reconnects the moment it returns. Instead the first failed connect starts an outage:
checkouts are turned away at once with a retry hint, and once the (jittered, exponentially
growing) delay has passed exactly one caller is let through as the probe. Its success ends the
outage for everyone; its failure starts the next, longer, round.

The class is pure bookkeeping — no I/O, no asyncio, no clock. The caller passes ``now`` (monotonic
seconds) and may inject the random source, so every decision is deterministic under test. Each
target owns its own instance, so one server being down never slows another.

Rounds. Connects admitted while the target was healthy may still be in flight when the outage
starts; when they fail they tell us nothing new. So a failure is counted (``failures`` goes up and
a new delay is drawn) only when the target was healthy (it starts round 1) or when a probe is in
flight (it ends that round). A failure reported while backing off with no probe in flight comes
from a connect admitted before the current round began: it changes nothing. A straggler failing
while a probe is in flight cannot be told from the probe and is counted as the probe's failure;
the worst that does is start the next round a little early.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable

__all__ = ["Admission", "Backoff"]


class Admission(enum.Enum):
    """What a checkout that needs a new connection may do, as decided by ``Backoff.admit``."""

    OPEN = "open"  # healthy: connect as usual, any number at once
    PROBE = "probe"  # backing off and the wait is over: this caller alone tries to connect
    REJECT = "reject"  # backing off: fail fast, ``Backoff.retry_after`` says for how long


class Backoff:
    """The reconnect state of one connection target.

    Every caller given ``OPEN`` or ``PROBE`` reports how its connect ended: ``succeeded()``,
    ``failed(now)``, or — only the probe, when it is cancelled before it knows —
    ``probe_abandoned()``.
    """

    __slots__ = (
        "_delay",
        "_failures",
        "_hurried",
        "_probing",
        "_retry_at",
        "_rng",
        "_since",
        "cap",
        "factor",
        "first",
        "floor",
    )

    def __init__(
        self,
        *,
        first: float = 0.1,
        cap: float = 30.0,
        factor: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not (math.isfinite(first) and first > 0.0):
            raise ValueError(f"first must be a positive number of seconds, got {first!r}")
        if not (math.isfinite(cap) and cap >= first):
            raise ValueError(f"cap must be a number of seconds >= first, got {cap!r}")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"factor must be a number >= 1, got {factor!r}")
        self.first = first
        self.cap = cap
        self.factor = factor
        # Full jitter may draw next to nothing; the floor keeps a run of tiny draws from turning
        # the probe into a tight reconnect loop against a server that is down.
        self.floor = first / 10.0
        self._rng = rng
        self._failures = 0
        self._retry_at: float | None = None  # None while healthy
        self._since: float | None = None
        self._delay = 0.0
        self._probing = False
        self._hurried = False  # this round's wait was already brought forward

    @property
    def failures(self) -> int:
        """Consecutive counted failures (rounds) of the current outage; 0 while healthy."""
        return self._failures

    @property
    def backing_off(self) -> bool:
        """Whether the target is in an outage (connects are not admitted freely)."""
        return self._retry_at is not None

    @property
    def probing(self) -> bool:
        """Whether a probe has been admitted and has not reported yet."""
        return self._probing

    @property
    def since(self) -> float | None:
        """When the current outage began (the ``now`` of its first failure), or None if healthy."""
        return self._since

    def bound(self, failures: int) -> float:
        """The largest delay after ``failures`` failures: ``first * factor**(n-1)``, capped."""
        try:
            grown = self.first * self.factor ** max(failures - 1, 0)
        except OverflowError:  # a very long outage: the cap was reached long ago
            return self.cap
        return min(self.cap, grown)

    def admit(self, now: float) -> Admission:
        """Decide what a checkout that needs a new connection may do at ``now``."""
        if self._retry_at is None:
            return Admission.OPEN
        if self._probing or now < self._retry_at:
            return Admission.REJECT
        self._probing = True
        return Admission.PROBE

    def succeeded(self) -> None:
        """A connect succeeded: the server is back, for every caller."""
        self._failures = 0
        self._retry_at = None
        self._since = None
        self._delay = 0.0
        self._probing = False
        self._hurried = False

    def failed(self, now: float) -> float:
        """A connect failed; returns the seconds until a probe may run.

        Counted (see the module docstring for rounds) it draws a new delay, ends the probe in
        flight and returns that delay; otherwise it returns what is left of the current wait.
        """
        if self._retry_at is None or self._probing:
            if self._since is None:
                self._since = now
            self._failures += 1
            bound = self.bound(self._failures)
            # Full jitter: clients cut off by the same outage spread their probes over the whole
            # window instead of returning in a herd. Out-of-range draws are clamped.
            draw = min(max(self._rng(), 0.0), 1.0)
            # min(): rounding must not carry a top draw past the bound.
            self._delay = min(bound, self.floor + draw * (bound - self.floor))
            self._retry_at = now + self._delay
            self._probing = False
            self._hurried = False
            # Not retry_after(now): (now + delay) - now can round to just below the floor.
            return self._delay
        return self.retry_after(now)

    def hurry(self, now: float, within: float) -> bool:
        """Another target of the same server just got through: retry within ``within`` s.

        The wait drawn for a long outage can run seconds past the server's return; once one
        target sees it back, the others need not sit out their full delays. One due later
        than the window draws its moment afresh, uniformly over it, so that they return
        spread evenly rather than in a herd; one due within it keeps its own moment (redrawing
        it, or keeping the earlier of two draws, would crowd the window's start). Once a
        round: every neighbour's return would otherwise draw again. Returns whether the wait
        was redrawn; nothing changes while healthy or while a probe is out.
        """
        if self._retry_at is None or self._probing or self._hurried:
            return False
        within = max(within, self.floor)
        if self._retry_at - now <= within:
            return False  # due within the window anyway, at a moment drawn as randomly
        self._hurried = True
        draw = min(max(self._rng(), 0.0), 1.0)
        self._retry_at = now + self.floor + draw * (within - self.floor)
        return True

    def probe_abandoned(self) -> None:
        """The probe was cancelled before it learned anything: let the next caller probe.

        A no-op when no probe is in flight (a failure or success already ended it).
        """
        self._probing = False

    def retry_after(self, now: float) -> float:
        """Seconds until a probe may run (0 when healthy or the wait is over); always >= 0.

        While a probe is in flight the answer is unknown; ``first`` is a short hint, since the
        probe will soon either reopen the target or start a longer wait.
        """
        if self._retry_at is None:
            return 0.0
        if self._probing:
            return self.first
        return max(0.0, self._retry_at - now)

    def __repr__(self) -> str:
        if self._retry_at is None:
            return "<Backoff healthy>"
        plural = "" if self._failures == 1 else "s"
        state = "probe in flight" if self._probing else f"delay {self._delay:.2f}s"
        return f"<Backoff backing off: {self._failures} failure{plural}, {state}>"
