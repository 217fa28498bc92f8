"""Health route and Prometheus metrics, read back and checked against the manager's figures."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations.

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from _asgi import held, serve, shared
from _postgres import PostgresCluster
from _support import drained
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tenantpool import PoolSettings, Target, TenantPoolManager
from tenantpool.fastapi import (
    Health,
    RequestConnection,
    TenantMiddleware,
    health_endpoint,
    install_error_handlers,
    manager_lifespan,
)
from tenantpool.fastapi.metrics import OTHER_POOLS, TenantPoolCollector, metrics_endpoint

pytestmark = pytest.mark.anyio

DOWN = "postgresql://x:s3cret@127.0.0.1:1/db"


def make_app(manager: TenantPoolManager, top_pools: int = 20) -> FastAPI:
    app = FastAPI(lifespan=manager_lifespan(manager))
    app.add_middleware(TenantMiddleware)
    install_error_handlers(app)
    app.add_route("/health", health_endpoint)
    app.add_route("/metrics", metrics_endpoint(top_pools=top_pools))

    @app.get("/who")
    async def who(conn: RequestConnection) -> int:
        return int(await conn.fetchval("SELECT 1"))

    @app.get("/status")
    async def status(report: Health) -> str:
        return report.status

    return app


async def test_health_route_ok_degraded_and_failing(pg: PostgresCluster) -> None:
    manager = TenantPoolManager({**shared(pg.dsn(), "acme"), "down": Target(DOWN)})
    async with serve(make_app(manager)) as (client, _):
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == (await manager.health()).as_dict()
        assert response.json()["status"] == "ok"
        assert response.headers["cache-control"] == "no-store"
        assert (await client.get("/status")).json() == "ok"

        assert (await client.get("/who", headers={"X-Tenant-ID": "acme"})).status_code == 200
        assert (await client.get("/who", headers={"X-Tenant-ID": "down"})).status_code == 503
        response = await client.get("/health")  # one target of two backing off
        assert (response.status_code, response.json()["status"]) == (200, "degraded")
        assert "s3cret" not in response.text

        await drained(manager)
        await manager.close()
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "failing"
        assert "the manager is closed" in response.json()["reasons"]


async def test_health_is_failing_with_every_target_down(pg: PostgresCluster) -> None:
    manager = TenantPoolManager({"down": Target(DOWN)})
    async with serve(make_app(manager)) as (client, _):
        assert (await client.get("/who", headers={"X-Tenant-ID": "down"})).status_code == 503
        response = await client.get("/health")
        body = response.json()
        assert (response.status_code, body["status"]) == (503, "failing")
        assert body["backing_off"] == ["postgresql://x@127.0.0.1:1/db"]
        assert "s3cret" not in response.text


def families(text: str) -> dict[str, list[Sample]]:
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], **labels: str) -> float:
    (found,) = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return found


@asynccontextmanager
async def holding(manager: TenantPoolManager, counts: dict[str, int]) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for tenant, n in counts.items():
            for _ in range(n):
                await stack.enter_async_context(held(manager, tenant))
        yield


async def test_metrics_figures_and_the_busiest_pools(pg: PostgresCluster) -> None:
    # Four pools (one DSN each), the busiest two labelled, the rest summed as "(other)".
    dsn = pg.dsn()
    sep = "&" if "?" in dsn else "?"
    targets = {
        name: Target(f"{dsn}{sep}application_name=m_{name}") for name in ("a", "b", "c", "d")
    }
    cap = 10
    manager = TenantPoolManager(
        targets, max_total_connections=cap, pool=PoolSettings(max_size=3, acquire_timeout=0.1)
    )
    async with serve(make_app(manager, top_pools=2)) as (client, _):
        for tenant in ("d", "c", "d"):
            assert (await client.get("/who", headers={"X-Tenant-ID": tenant})).status_code == 200
        async with holding(manager, {"a": 3, "b": 2, "c": 1}):
            # a's pool is full: one PoolTimeout, counted.
            assert (await client.get("/who", headers={"X-Tenant-ID": "a"})).status_code == 503
            response = await client.get("/metrics")
            stats = manager.stats()
            assert len(stats.pools) == 4  # read now: per-pool figures are taken when first read
        await drained(manager)

    assert response.headers["content-type"].startswith("text/plain")
    assert pg.superuser_password not in response.text
    found = families(response.text)
    names = {
        t: f"{dsn}{sep}application_name=m_{t}".replace(f":{pg.superuser_password}", "")
        for t in targets
    }
    assert names["a"] in stats.pools

    connections = found["tenantpool_connections"]
    for state in ("in_use", "idle", "opening", "releasing", "closing"):
        assert value(connections, state=state) == sum(
            getattr(p, state) for p in stats.pools.values()
        )
    assert value(connections, state="in_use") == 6
    assert sum(s.value for s in connections) == stats.total

    per_pool = found["tenantpool_pool_connections"]
    assert {s.labels["pool"] for s in per_pool} == {names["a"], names["b"], OTHER_POOLS}
    assert value(per_pool, pool=names["a"], state="in_use") == 3
    assert value(per_pool, pool=names["b"], state="in_use") == 2
    assert value(per_pool, pool=OTHER_POOLS, state="in_use") == 1
    other = [stats.pools[names["c"]], stats.pools[names["d"]]]
    assert value(per_pool, pool=OTHER_POOLS, state="idle") == sum(p.idle for p in other)
    assert {s.labels["pool"] for s in found["tenantpool_pool_waiting"]} == {
        names["a"],
        names["b"],
        OTHER_POOLS,
    }

    assert value(found["tenantpool_max_connections"]) == cap
    assert value(found["tenantpool_waiting"]) == stats.waiting == 0
    assert value(found["tenantpool_pools"]) == 4
    assert value(found["tenantpool_targets_backing_off"]) == 0
    for counter in ("checkouts", "timeouts", "steals", "recycles", "connect_errors"):
        samples = found[f"tenantpool_{counter}"]
        assert value(samples) == getattr(stats, counter), counter
    assert stats.checkouts == 9 and stats.timeouts == 1

    histogram = found["tenantpool_checkout_wait_seconds"]
    buckets = {float(s.labels["le"]): s.value for s in histogram if s.name.endswith("_bucket")}
    assert buckets == {**dict(stats.wait_time.buckets), float("inf"): stats.wait_time.count}
    counts = [s.value for s in histogram if s.name.endswith("_count")]
    assert counts == [stats.wait_time.count]
    assert [s.value for s in histogram if s.name.endswith("_sum")] == [stats.wait_time.sum]


async def test_pool_labels_stay_bounded_with_many_pools(pg: PostgresCluster) -> None:
    dsn = pg.dsn()
    sep = "&" if "?" in dsn else "?"
    targets = {f"p{i}": Target(f"{dsn}{sep}application_name=many_{i}") for i in range(25)}
    async with TenantPoolManager(targets) as manager:
        for tenant in targets:
            async with manager.with_connection(tenant) as conn:
                await conn.fetchval("SELECT 1")
        await drained(manager)
        # The default keeps 20 pools apart; the other 5 are summed.
        found = families(generate_latest(TenantPoolCollector(manager)).decode())
        pools = {s.labels["pool"] for s in found["tenantpool_pool_connections"]}
        assert len(pools) == 21 and OTHER_POOLS in pools
        assert value(found["tenantpool_pools"]) == 25
        assert sum(s.value for s in found["tenantpool_pool_connections"]) == 25
        found = families(generate_latest(TenantPoolCollector(manager, top_pools=0)).decode())
        assert {s.labels["pool"] for s in found["tenantpool_pool_connections"]} == {OTHER_POOLS}


async def test_collector_in_a_registry(pg: PostgresCluster) -> None:
    registry = CollectorRegistry()
    current: list[TenantPoolManager] = []
    collector = TenantPoolCollector(lambda: current[0] if current else None, namespace="app_db")
    registry.register(collector)
    # describe() names every family, so a clash is caught at registration.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(TenantPoolCollector(lambda: None, namespace="app_db"))
    assert generate_latest(registry) == b""  # no manager yet, no samples
    requests = Counter("app_requests", "Requests.", registry=registry)
    requests.inc()

    async with TenantPoolManager(shared(pg.dsn(), "acme")) as manager:
        current.append(manager)
        async with manager.with_connection("acme"):
            found = families(generate_latest(registry).decode())
        assert value(found["app_db_connections"], state="in_use") == 1
        assert "max_connections" not in " ".join(found)  # no cap, no cap series
        assert repr(collector) == "<TenantPoolCollector app_db_* top_pools=20>"

        app = FastAPI()
        app.add_middleware(TenantMiddleware, manager=manager)
        app.add_route("/metrics", metrics_endpoint(also=registry))
        async with serve(app) as (client, _):
            text = (await client.get("/metrics")).text
        found = families(text)
        assert "tenantpool_checkouts" in found and "app_requests" in found
    with pytest.raises(ValueError, match="top_pools"):
        TenantPoolCollector(manager, top_pools=-1)
