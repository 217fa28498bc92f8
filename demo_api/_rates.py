"""The dashboard's live figures: the manager's counters sampled once a second, the last minute."""

from __future__ import annotations

import collections
import time

import anyio

from tenantpool import TenantPoolManager

from ._models import RateSample

__all__ = ["Rates"]


class Rates:
    """Samples ``manager.stats()`` every ``interval`` seconds and keeps the last ``keep``.

    Sampled on the server, not in the page: a page opened now shows the last minute at once,
    and its rates are per second of real time whatever the browser's clock does.
    """

    def __init__(self, interval: float = 1.0, keep: int = 60) -> None:
        self.interval = interval
        self._samples: collections.deque[RateSample] = collections.deque(maxlen=keep)
        self._last: tuple[float, int] | None = None

    def history(self) -> list[RateSample]:
        return list(self._samples)

    def sample(self, manager: TenantPoolManager, now: float | None = None) -> None:
        """Record one sample: checkouts per second since the last one, and the current gauges."""
        now = time.monotonic() if now is None else now
        stats = manager.stats()
        if self._last is not None and now > self._last[0]:
            rate = (stats.checkouts - self._last[1]) / (now - self._last[0])
            self._samples.append(
                RateSample(
                    checkouts_per_s=round(rate, 1),
                    waiting=stats.waiting,
                    in_use=stats.in_use,
                    total=stats.total,
                )
            )
        self._last = (now, stats.checkouts)

    async def run(self, manager: TenantPoolManager) -> None:
        """Sample until cancelled."""
        while True:
            self.sample(manager)
            await anyio.sleep(self.interval)
