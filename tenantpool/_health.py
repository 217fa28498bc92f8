"""The health verdict: ``ok``, ``degraded`` or ``failing``, with the figures behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ._stats import Totals

__all__ = ["HealthReport", "assess"]

Status = Literal["ok", "degraded", "failing"]
TaskState = Literal["not started", "running", "stopped", "dead"]

# A checkout queued this long means requests are piling up, not just passing through.
WAITING_DEGRADED_AFTER = 1.0
# At the cap with nothing idle to steal for this long: the cap is too low for the load.
SATURATED_DEGRADED_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What ``await manager.health()`` returns; ``as_dict()`` is ready for JSON."""

    status: Status
    reasons: tuple[str, ...]  # why the status is not "ok", one sentence each
    background_task: TaskState
    targets: int  # pools the manager knows
    backing_off: tuple[str, ...]  # names (no passwords) of pools whose target is failing
    total: int
    in_use: int
    idle: int
    waiting: int
    max_total: int | None
    longest_wait: float  # seconds the oldest queued checkout has waited
    saturated_for: float  # seconds at the cap with nothing idle to steal

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reasons": list(self.reasons),
            "background_task": self.background_task,
            "targets": self.targets,
            "backing_off": list(self.backing_off),
            "total": self.total,
            "in_use": self.in_use,
            "idle": self.idle,
            "waiting": self.waiting,
            "max_total": self.max_total,
            "longest_wait": round(self.longest_wait, 3),
            "saturated_for": round(self.saturated_for, 3),
        }


def assess(
    totals: Totals,
    *,
    closed: bool,
    background_task: TaskState,
    longest_wait: float,
    saturated_for: float,
    backing_off: tuple[str, ...],
) -> HealthReport:
    """Judge the manager's state; a pure function of the figures it is given (which never
    include per-pool detail, so that it costs the same however many pools there are)."""
    targets = totals.targets
    failing: list[str] = []
    degraded: list[str] = []
    if closed:
        failing.append("the manager is closed")
    elif background_task == "not started":
        failing.append("the manager is not started")
    elif background_task != "running":
        failing.append(f"the background task is {background_task}")
    if backing_off and len(backing_off) == targets:
        failing.append(f"every known target is down ({len(backing_off)})")
    elif backing_off:
        degraded.append(f"{len(backing_off)} of {targets} targets are backing off")
    if longest_wait >= WAITING_DEGRADED_AFTER:
        degraded.append(
            f"{totals.waiting} checkouts are waiting, the oldest for {longest_wait:.1f} s"
        )
    if saturated_for >= SATURATED_DEGRADED_AFTER:
        degraded.append(
            f"every connection under the cap of {totals.max_total} has been in use"
            f" for {saturated_for:.1f} s"
        )
    status: Status = "failing" if failing else "degraded" if degraded else "ok"
    return HealthReport(
        status=status,
        reasons=(*failing, *degraded),
        background_task=background_task,
        targets=targets,
        backing_off=backing_off,
        total=totals.total,
        in_use=totals.in_use,
        idle=totals.idle,
        waiting=totals.waiting,
        max_total=totals.max_total,
        longest_wait=longest_wait,
        saturated_for=saturated_for,
    )
