"""What every scenario shares: the throwaway cluster, interleaved rounds, medians, reports.

A scenario is a module with ``TITLE`` and ``run(ctx) -> Report``. It measures its contenders
round by round (``interleave``), so drift on the machine hits all of them alike, and reports
medians over rounds and ratios between contenders of the same run, never absolute claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _postgres import PostgresCluster  # noqa: E402
from _support import tenant_dsn  # noqa: E402

__all__ = [
    "Context",
    "Goal",
    "PostgresCluster",
    "Report",
    "cluster",
    "for_duration",
    "interleave",
    "median",
    "percentile",
    "ratio",
    "server_cpu",
    "table",
    "tenant_dsn",
    "timed_loop",
    "wait_until",
]

T = TypeVar("T")


@dataclass
class Context:
    """Run-wide settings handed to each scenario."""

    quick: bool
    rounds: int
    out_dir: Path
    shared: PostgresCluster  # the default cluster; scenarios needing other settings start theirs

    def pick(self, quick: T, full: T) -> T:
        return quick if self.quick else full


@dataclass
class Goal:
    """A target from the issue, and whether this run met it (``None``: not measurable here)."""

    text: str
    met: bool | None
    detail: str = ""

    def line(self) -> str:
        mark = {True: "met", False: "**missed**", None: "not measured"}[self.met]
        return f"- {self.text}: {mark}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    """One scenario's outcome: a markdown table, its goals, JSON-ready data, an optional plot."""

    name: str
    title: str
    table: str
    goals: list[Goal] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Draws onto a matplotlib Axes; kept as a callable so matplotlib loads only when plotting.
    plot: Callable[[Any], None] | None = None

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", self.table]
        if self.notes:
            parts += ["", *self.notes]
        if self.goals:
            parts += ["", *(goal.line() for goal in self.goals)]
        return "\n".join(parts)


@contextlib.contextmanager
def cluster(**server_settings: str) -> Iterator[PostgresCluster]:
    """A throwaway cluster of its own, for scenarios that need other server settings."""
    with PostgresCluster(server_settings=server_settings) as pg:
        yield pg


async def interleave(
    rounds: int, contenders: Mapping[str, Callable[[], Awaitable[T]]]
) -> dict[str, list[T]]:
    """Run each contender once per round, in turn, and collect every round's result."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, measure in contenders.items():
            results[name].append(await measure())
    return results


async def timed_loop(step: Callable[[], Awaitable[object]], iterations: int) -> float:
    """Mean µs per ``step`` over ``iterations`` calls, after a tenth as many to warm up."""
    for _ in range(max(1, iterations // 10)):
        await step()
    started = time.perf_counter()
    for _ in range(iterations):
        await step()
    return (time.perf_counter() - started) / iterations * 1e6


async def for_duration(tasks: int, seconds: float, step: Callable[[], Awaitable[object]]) -> int:
    """Run ``tasks`` concurrent loops of ``step`` for ``seconds``; the number of steps done."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await step()
            done += 1

    await asyncio.gather(*(loop() for _ in range(tasks)))
    return done


async def wait_until(predicate: Callable[[], bool], limit: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took. Raises after ``limit`` seconds."""
    started = time.perf_counter()
    # Polling: what we wait for (a refill, a reap) happens on the library's own schedule and
    # has no event to wait on from outside.
    while not predicate():
        if time.perf_counter() - started > limit:
            raise TimeoutError(f"{what}: not reached after {limit:.0f} s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


def server_cpu(pg: PostgresCluster) -> float | None:
    """CPU seconds the cluster's processes (postmaster and children) have used, from /proc.

    None for a server we did not start (its processes may be elsewhere). Read before and after
    a run, it tells how much of the cost lands on the server rather than in our process.
    """
    server = getattr(pg, "_server", None)
    postmaster = server.postmaster_pid() if server is not None else None
    if postmaster is None:
        return None
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # fields[1] is the parent pid; [11], [12] user and system time in clock ticks.
        if entry.name == str(postmaster) or fields[1] == str(postmaster):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown table; ``align`` holds one of ``l``/``r`` per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
