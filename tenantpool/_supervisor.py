"""Every task a manager starts, so that ``close()`` can wait for all of them.

Pools open and close connections in tasks; the resolver cache looks tenants up in tasks; the
background task is one. All are spawned here, but a pool's resets and pings (one per dirty
release, on the hot path): those are the pool's own, and the manager's ``close()`` awaits each
pool's ``close()``, which ends them, before it stops these. ``close()`` lets the pools finish
their work within its budget, then cancels what is left, and repeats until none is left: work
cut short may start more (a reset that fails closes its connection), and those are awaited
too, so nothing of the manager runs after ``close()`` returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Supervisor"]

T = TypeVar("T")


class Supervisor:
    """The tasks of one manager."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel every task, those started meanwhile included, and wait for them to end."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
