"""Scenario 7: what the cap costs, sequential checkouts over 40 tenants with pools of their own.

Three managers, same tenants, same round-robin order: no cap (every pool keeps its idle
connection: the cap's bookkeeping is all that differs from the next row); a cap of 40, saturated
but never short (every slot is taken, none needs stealing); a cap of 20 (every checkout finds its
pool empty and must close another tenant's idle connection, least recently used, and open one).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from tenantpool import PoolSettings, Target, TenantPoolManager

from ._harness import Context, Report, interleave, median, ratio, table, tenant_dsn, timed_loop

TITLE = "7. Cost of the cap: sequential checkouts over 40 tenants, at saturation"
TENANTS = 40
NO_CAP = "no cap"
SATURATED = f"cap {TENANTS}: saturated, no steal"
STEALING = f"cap {TENANTS // 2}: a steal per checkout"


def run(ctx: Context) -> Report:
    results, steals = asyncio.run(_measure(ctx))
    medians = {name: median(values) for name, values in results.items()}
    base = medians[NO_CAP]
    rows = [
        [name, f"{value:,.0f}", f"{ratio(value, base):.2f}x", f"{steals[name]:,}"]
        for name, value in medians.items()
    ]
    return Report(
        name="cap_cost",
        title=TITLE,
        table=table(["manager", "median µs per checkout", "vs no cap", "steals"], rows),
        notes=[
            f"checkout + SELECT 1 + release, tenants taken round-robin, {ctx.rounds} rounds"
            " interleaved; each tenant has a connection identity (so a pool) of its own. A"
            " steal costs a connect (TCP, SCRAM authentication, backend start) plus the close"
            " of the victim, which the cap requires to finish before the new one opens."
        ],
        data={"us_per_checkout": results, "median_us": medians, "steals": steals},
        plot=lambda ax: _plot(ax, medians),
    )


async def _measure(ctx: Context) -> tuple[dict[str, list[float]], dict[str, int]]:
    dsn = ctx.shared.dsn()
    targets = {
        f"t{i}": Target(tenant_dsn(dsn, f"t{i}"), settings={"app.tenant_id": f"t{i}"})
        for i in range(TENANTS)
    }
    caps = {NO_CAP: None, SATURATED: TENANTS, STEALING: TENANTS // 2}
    managers = {
        name: TenantPoolManager(targets, max_total_connections=cap, pool=PoolSettings(max_size=2))
        for name, cap in caps.items()
    }
    steps = {}
    for name, manager in managers.items():
        await manager.start()
        order = itertools.cycle(targets)

        async def step(manager: TenantPoolManager = manager, order: Any = order) -> None:
            async with manager.with_connection(next(order)) as conn:
                await conn.execute("SELECT 1")

        steps[name] = step
    iterations = {NO_CAP: 2000, SATURATED: 2000, STEALING: 200}
    if ctx.quick:
        iterations = {name: n // 2 for name, n in iterations.items()}
    try:
        results = await interleave(
            ctx.rounds,
            {name: (lambda n=name: timed_loop(steps[n], iterations[n])) for name in managers},
        )
        steals = {name: m.stats().steals for name, m in managers.items()}
    finally:
        await asyncio.gather(*(m.close() for m in managers.values()))
    return results, steals


def _plot(ax: Any, medians: dict[str, float]) -> None:
    names = list(medians)
    ax.barh(names, [medians[n] for n in names], color=["#4c72b0", "#55a868", "#dd8452"])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per checkout + SELECT 1 + release (median, log scale)")
