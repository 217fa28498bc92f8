"""Scenario 6: memory per tenant, once served and idle, and once tenantpool has forgotten it.

Each contender runs in a fresh Python process of its own, so its resident set size (RSS) is
not muddled by the other's or by earlier scenarios. Every tenant has a connection identity of
its own (its DSN differs by ``application_name``), so each gets a pool: the worst case for
memory, as with a database or credentials per tenant. Before the baseline is read, a few
hundred other tenants are served and dropped, so that caches and the allocator's arenas warmed
by the first pools are not charged to the measured ones.

    python -m benchmarks.memory DSN TENANTS CONTENDER   (prints one JSON line; internal)
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ._harness import Context, Goal, Report, table, tenant_dsn, wait_until

TITLE = "6. Memory: RSS per tenant served once, then idle, then forgotten"
TENANTPOOL = "tenantpool"
HEAP = "tenantpool (Python heap, tracemalloc)"
HAND_ROLLED = "dict of asyncpg.Pool"
WARM_UP = 300
WORKERS = 16
CAP = 20
GOAL_BYTES = 2048


def run(ctx: Context) -> Report:
    tenants = ctx.pick(1000, 10_000)
    # Over the Unix socket, which trusts local users: memory does not depend on the transport,
    # and a SCRAM handshake per tenant would make this scenario minutes long.
    pg = ctx.shared
    dsn = f"postgresql://{pg.superuser}@/postgres?host={pg.base_dir}&port={pg.port}"
    # tracemalloc slows every allocation down: its run needs fewer tenants to read the heap.
    sizes = {TENANTPOOL: tenants, HAND_ROLLED: tenants, HEAP: min(tenants, 2000)}
    results = {name: _child(dsn, n, name) for name, n in sizes.items()}
    ours, theirs, heap = results[TENANTPOOL], results[HAND_ROLLED], results[HEAP]
    rows = [
        [
            TENANTPOOL + " (RSS)",
            f"{ours['idle_per_tenant']:,.0f}",
            f"{ours['forgotten_per_tenant']:,.0f}",
            f"{ours['idle_per_tenant'] / theirs['idle_per_tenant']:.2f}x",
        ],
        [HEAP, f"{heap['idle_per_tenant']:,.0f}", f"{heap['forgotten_per_tenant']:,.0f}", ""],
        [HAND_ROLLED + " (RSS)", f"{theirs['idle_per_tenant']:,.0f}", "never forgets", "1.00x"],
    ]
    forgotten = ours["forgotten_per_tenant"]
    return Report(
        name="memory",
        title=TITLE,
        table=table(
            [
                "contender",
                "bytes per idle tenant",
                "bytes per forgotten tenant",
                "idle vs asyncpg.Pool",
            ],
            rows,
        ),
        notes=[
            f"{tenants:,} tenants, each with a pool of its own, served once (checkout +"
            f" SELECT 1 + release) by {WORKERS} workers; RSS growth over a baseline divided by"
            f" the tenants. tenantpool runs with a cap of {CAP}, so an idle tenant holds a pool"
            " and no connection; the hand-rolled pools close their idle connections after"
            " 0.1 s (max_inactive_connection_lifetime), so theirs hold none either. One run per"
            " contender, in a fresh process each: RSS is a property of the process, not of a"
            " round. RSS hardly shrinks once the allocator has grown (freed memory is kept for"
            " reuse), so the RSS cost of a forgotten tenant is measured as the growth while a"
            " second batch of as many new tenants is served and forgotten; the heap row reads"
            " the live Python objects directly (a separate run, under tracemalloc)."
        ],
        goals=[
            Goal(
                f"≤ {GOAL_BYTES:,} bytes per forgotten tenant",
                forgotten <= GOAL_BYTES,
                f"{forgotten:,.0f} bytes of RSS, {heap['forgotten_per_tenant']:,.0f} of live heap",
            )
        ],
        data={"tenants": sizes, "results": results},
        plot=lambda ax: _plot(ax, results),
    )


def _child(dsn: str, tenants: int, contender: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", dsn, str(tenants), contender],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child ({contender}) failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _serve(names: list[str], checkout: Callable[[str], Awaitable[None]]) -> None:
    queue = list(reversed(names))

    async def worker() -> None:
        while queue:
            await checkout(queue.pop())

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def _tenantpool(dsn: str, tenants: int, heap: bool) -> dict[str, Any]:
    from tenantpool import PoolSettings, Target, TenantPoolManager

    batches = {b: [f"{b}{i}" for i in range(n)] for b, n in (("w", WARM_UP), ("a", tenants))}
    batches["b"] = [f"b{i}" for i in range(tenants)]
    names = [name for batch in batches.values() for name in batch]
    targets = {name: Target(tenant_dsn(dsn, name)) for name in names}
    manager = TenantPoolManager(
        targets,
        max_total_connections=CAP,
        pool=PoolSettings(idle_timeout=0.5),
        reap_interval=0.1,
        forget_after=3600,
    )

    async def checkout(name: str) -> None:
        async with manager.with_connection(name) as conn:
            await conn.execute("SELECT 1")

    def pools() -> int:
        return len(manager.stats().pools)

    async def serve_and_idle(batch: str) -> int:
        await _serve(batches[batch], checkout)
        assert pools() == len(batches[batch]), pools()
        await wait_until(lambda: manager.stats().total == 0, 60, "idle connections reaped")
        return measure()

    async def forget_all() -> int:
        manager.forget_after = 0.2
        await wait_until(lambda: pools() == 0, 60, "every pool forgotten")
        manager.forget_after = 3600
        await asyncio.sleep(1.0)  # the last closes' tasks and callbacks finish
        return measure()

    if heap:
        tracemalloc.start()
    measure = _heap if heap else _rss
    async with manager:
        await serve_and_idle("w")
        base = await forget_all()
        idle = await serve_and_idle("a")
        after_a = await forget_all()
        await serve_and_idle("b")
        after_b = await forget_all()
    kind = "heap" if heap else "rss"
    return {
        f"{kind}_baseline": base,
        f"{kind}_idle": idle,
        f"{kind}_forgotten_a": after_a,
        f"{kind}_forgotten_b": after_b,
        "idle_per_tenant": (idle - base) / tenants,
        # RSS rarely shrinks (the allocator keeps freed memory for reuse), so what a forgotten
        # tenant costs shows as growth over a second batch; the heap can be read directly.
        "forgotten_per_tenant": ((after_b - after_a) if not heap else (after_a - base)) / tenants,
    }


async def _hand_rolled(dsn: str, tenants: int) -> dict[str, Any]:
    warm = [f"w{i}" for i in range(WARM_UP)]
    measured = [f"t{i}" for i in range(tenants)]
    dsns = {name: tenant_dsn(dsn, name) for name in warm + measured}
    pools: dict[str, asyncpg.Pool] = {}

    async def checkout(name: str) -> None:
        pool = pools.get(name)
        if pool is None:
            pool = pools[name] = await asyncpg.create_pool(
                dsns[name], min_size=0, max_size=5, max_inactive_connection_lifetime=0.1
            )
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")

    def held() -> int:
        return sum(p.get_size() for p in pools.values())

    await _serve(warm, checkout)
    await wait_until(lambda: held() == 0, 60, "idle connections closed")
    for name in warm:
        await pools.pop(name).close()
    baseline = _rss()
    await _serve(measured, checkout)
    await wait_until(lambda: held() == 0, 60, "idle connections closed")
    idle = _rss()
    await asyncio.gather(*(p.close() for p in pools.values()))
    return {
        "baseline_rss": baseline,
        "idle_rss": idle,
        "idle_per_tenant": (idle - baseline) / tenants,
    }


def _plot(ax: Any, results: dict[str, dict[str, Any]]) -> None:
    ours = results[TENANTPOOL]
    labels = [f"{HAND_ROLLED}\nidle", f"{TENANTPOOL}\nidle", f"{TENANTPOOL}\nforgotten"]
    values = [
        results[HAND_ROLLED]["idle_per_tenant"],
        ours["idle_per_tenant"],
        ours["forgotten_per_tenant"],
    ]
    ax.bar(labels, values, color=["#dd8452", "#4c72b0", "#55a868"])
    ax.axhline(GOAL_BYTES, color="#c44e52", linestyle="--", label="goal: 2 KB per forgotten")
    ax.set_ylabel("RSS bytes per tenant")
    ax.legend()


if __name__ == "__main__":
    _dsn, _tenants, _contender = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if _contender == HAND_ROLLED:
        _result = asyncio.run(_hand_rolled(_dsn, _tenants))
    else:
        _result = asyncio.run(_tenantpool(_dsn, _tenants, heap=_contender == HEAP))
    print(json.dumps(_result))
