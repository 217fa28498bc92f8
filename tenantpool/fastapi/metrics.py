"""Prometheus metrics read from ``manager.stats()`` at scrape time (``tenantpool[prometheus]``).

Nothing is recorded per checkout: ``TenantPoolCollector`` turns the manager's snapshot into
metric families whenever Prometheus scrapes. Series (``tenantpool_`` prefix by default):

==========================================  =========  ======================================
``connections{state}``                      gauge      over all pools; states sum to the total
``max_connections``                         gauge      ``max_total_connections`` (if any)
``waiting``                                 gauge      checkouts queued
``quota_waiting``                           gauge      checkouts held back by ``max_in_use``
``pools``                                   gauge      pools the manager knows
``targets_backing_off``                     gauge      pools whose target refuses connections
``pool_connections{pool,state}``            gauge      the busiest pools, and ``(other)``
``pool_waiting{pool}``                      gauge      the busiest pools, and ``(other)``
``checkouts_total``                         counter
``timeouts_total``                          counter    ``PoolTimeout`` raised
``quota_waits_total``                       counter    checkouts that waited for their quota
``steals_total``                            counter    idle connections closed for another pool
``recycles_total``                          counter    connections closed at ``max_age``
``connect_errors_total``                    counter
``checkout_wait_seconds``                   histogram  time a checkout waited for a connection
==========================================  =========  ======================================

Label cardinality stays bounded however many tenants there are: only the ``top_pools``
busiest pools (most connections in use plus checkouts waiting, then most connections, then
by name) get a ``pool`` label of their own, a pool's name being its DSN without password;
every other pool is summed into ``pool="(other)"``. So a scrape holds at most
``(top_pools + 1) * 5`` ``pool_connections`` series, whatever the number of tenants.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence

try:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "tenantpool.fastapi.metrics needs prometheus_client: pip install 'tenantpool[prometheus]'"
    ) from exc
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .._manager import TenantPoolManager
from .._stats import ManagerStats, PoolStats, WaitTimes
from ._context import manager_for

__all__ = ["OTHER_POOLS", "TenantPoolCollector", "metrics_endpoint"]

OTHER_POOLS = "(other)"  # the pool label of the aggregate; no DSN can look like it
STATES = ("in_use", "idle", "opening", "releasing", "closing")


class TenantPoolCollector(Collector):
    """A prometheus_client collector over a manager: ``REGISTRY.register(collector)``.

    ``manager`` may be a callable returning the manager (or ``None`` before it exists), for
    a manager created at startup.
    """

    def __init__(
        self,
        manager: TenantPoolManager | Callable[[], TenantPoolManager | None],
        *,
        top_pools: int = 20,
        namespace: str = "tenantpool",
    ) -> None:
        if top_pools < 0:
            raise ValueError("top_pools must be >= 0")
        self._manager = manager
        self.top_pools = top_pools
        self.namespace = namespace

    def _stats(self) -> ManagerStats | None:
        source = self._manager
        manager = source if isinstance(source, TenantPoolManager) else source()
        return None if manager is None else manager.stats()

    def describe(self) -> Iterator[Metric]:
        # Every family's name, from an empty snapshot: lets a registry check for clashes
        # before the manager exists.
        return self._families(_NOTHING)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is not None:
            yield from self._families(stats)

    def _families(self, stats: ManagerStats) -> Iterator[Metric]:
        ns = self.namespace
        connections = GaugeMetricFamily(
            f"{ns}_connections", "Open connections over all pools, by state.", labels=["state"]
        )
        pool_connections = GaugeMetricFamily(
            f"{ns}_pool_connections",
            f"Open connections by state, for the {self.top_pools} busiest pools and"
            f" {OTHER_POOLS} for the rest.",
            labels=["pool", "state"],
        )
        pool_waiting = GaugeMetricFamily(
            f"{ns}_pool_waiting",
            f"Checkouts queued, for the {self.top_pools} busiest pools and {OTHER_POOLS}"
            " for the rest.",
            labels=["pool"],
        )
        pools = sorted(stats.pools.values(), key=_busiest_first)
        busiest, rest = pools[: self.top_pools], pools[self.top_pools :]
        for state in STATES:
            connections.add_metric([state], sum(getattr(p, state) for p in pools))
        for pool in busiest:
            _add_pool(pool_connections, pool_waiting, pool.name, [pool])
        if rest:
            _add_pool(pool_connections, pool_waiting, OTHER_POOLS, rest)
        yield connections
        yield pool_connections
        yield pool_waiting
        if stats.max_total is not None:
            yield GaugeMetricFamily(
                f"{ns}_max_connections",
                "The cap over all pools (max_total_connections).",
                value=stats.max_total,
            )
        yield GaugeMetricFamily(f"{ns}_waiting", "Checkouts queued.", value=stats.waiting)
        yield GaugeMetricFamily(
            f"{ns}_quota_waiting",
            "Checkouts waiting because their tenant holds its max_in_use.",
            value=stats.quota_waiting,
        )
        yield GaugeMetricFamily(f"{ns}_pools", "Pools the manager knows.", value=len(pools))
        yield GaugeMetricFamily(
            f"{ns}_targets_backing_off",
            "Pools whose target refuses connections; their checkouts fail fast.",
            value=stats.backing_off,
        )
        for name, value, text in (
            ("checkouts", stats.checkouts, "Completed checkouts."),
            ("timeouts", stats.timeouts, "Checkouts that raised PoolTimeout."),
            ("quota_waits", stats.quota_waits, "Checkouts that waited for their tenant's quota."),
            ("steals", stats.steals, "Idle connections closed to make room for another pool."),
            ("recycles", stats.recycles, "Connections closed for reaching their max_age."),
            ("connect_errors", stats.connect_errors, "Failed connection attempts."),
        ):
            yield CounterMetricFamily(f"{ns}_{name}", text, value=value)
        wait = stats.wait_time
        buckets: list[tuple[str, float]] = [(_bound(b), n) for b, n in wait.buckets]
        buckets.append(("+Inf", wait.count))
        yield HistogramMetricFamily(
            f"{ns}_checkout_wait_seconds",
            "Time a checkout waited for a connection (zero when one was idle).",
            buckets=buckets,
            sum_value=wait.sum,
        )

    def __repr__(self) -> str:
        return f"<TenantPoolCollector {self.namespace}_* top_pools={self.top_pools}>"


_NOTHING = ManagerStats(
    total=0,
    in_use=0,
    idle=0,
    waiting=0,
    max_total=0,
    pools={},
    checkouts=0,
    timeouts=0,
    steals=0,
    recycles=0,
    connect_errors=0,
    backing_off=0,
    wait_time=WaitTimes(buckets=(), count=0, sum=0.0),
)


def _busiest_first(pool: PoolStats) -> tuple[int, int, str]:
    return (-(pool.in_use + pool.waiting), -pool.size, pool.name)


def _bound(upper: float) -> str:
    # The text form prometheus_client gives its own histograms' bounds (0.005, 1.0, 10.0).
    return repr(float(upper))


def _add_pool(
    connections: GaugeMetricFamily,
    waiting: GaugeMetricFamily,
    label: str,
    pools: Sequence[PoolStats],
) -> None:
    for state in STATES:
        connections.add_metric([label, state], sum(getattr(p, state) for p in pools))
    waiting.add_metric([label], sum(p.waiting for p in pools))


def metrics_endpoint(
    manager: TenantPoolManager | None = None,
    *,
    top_pools: int = 20,
    also: Collector | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint serving the request's manager's metrics in Prometheus' text format.

    ``app.add_route("/metrics", metrics_endpoint())`` in FastAPI, ``Route("/metrics",
    metrics_endpoint())`` in Starlette. The manager is ``manager``, else the request's (from
    the middleware or lifespan state). ``also`` (say, ``prometheus_client.REGISTRY``) is
    served after ours, in the same response.
    """

    async def endpoint(request: Request) -> Response:
        target = manager if manager is not None else manager_for(request.scope)
        body = generate_latest(TenantPoolCollector(target, top_pools=top_pools))
        if also is not None:
            body += generate_latest(also)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return endpoint
