"""The background task: every ``reap_interval``, each pool's upkeep, one duty at a time.

Each duty runs on its own in a ``try``: a bug or an odd connection in one duty of one pool is
logged and the rest still run. The duties themselves are synchronous pool methods that start any
I/O (pings, closes, opens) as tasks of the pool, so one slow server never delays the sweep of
the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ._health import TaskState

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["Maintenance"]

logger = logging.getLogger("tenantpool")

PoolDuty = Callable[["Pool", float], None]

POOL_DUTIES: tuple[tuple[str, PoolDuty], ...] = (
    ("reap", lambda pool, now: pool.reap(now)),
    ("recycle", lambda pool, now: pool.recycle(now)),
    ("keepalive", lambda pool, now: pool.keepalive(now)),
    ("refill", lambda pool, now: pool.upkeep_refill()),
    ("watchdog", lambda pool, now: pool.watchdog(now)),
)


class Maintenance:
    """Runs the pool duties and the manager's own (``chores``) every ``interval`` seconds."""

    def __init__(
        self,
        interval: float,
        pools: Callable[[], Iterable[Pool]],
        chores: Sequence[tuple[str, Callable[[float], object]]],
        spawn: Callable[..., asyncio.Task[None]] | None = None,
    ) -> None:
        self.interval = interval
        self._pools = pools
        self._chores = chores
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def state(self) -> TaskState:
        if self._task is None:
            return "not started"
        if self._stopped:
            return "stopped"
        return "dead" if self._task.done() else "running"

    def start(self) -> None:
        if self._task is None:
            name = "tenantpool maintenance"
            if self._spawn is not None:
                self._task = self._spawn(self._run(), name=name)
            else:
                self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
            self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        self._stopped = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopped:
            return
        if task.cancelled():
            logger.error("tenantpool: the background task was cancelled; pools get no upkeep")
        elif (exc := task.exception()) is not None:
            logger.error("tenantpool: the background task died; pools get no upkeep", exc_info=exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        """One round of every duty; ``now`` is ``time.monotonic()``."""
        for pool in list(self._pools()):
            if not pool.needs_upkeep:
                continue
            for name, duty in POOL_DUTIES:
                try:
                    duty(pool, now)
                except Exception:
                    logger.exception("tenantpool: %s failed for %s", name, pool.name)
        for name, chore in self._chores:
            try:
                chore(now)
            except Exception:
                logger.exception("tenantpool: %s failed", name)
