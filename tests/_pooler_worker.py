"""One OS process of the multi-process test: a manager of its own, load over many tenants.

Reads its configuration as JSON from argv[1], says ``ready`` once its manager is open, starts
its load when a line arrives on stdin, and prints one JSON line of counts when done.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

from tenantpool import PoolSettings, PoolTimeout, Target, TenantPoolManager


async def main(config: dict[str, Any]) -> dict[str, Any]:
    tenants: dict[str, dict[str, Any]] = config["tenants"]
    resolver = {
        name: Target(
            spec["dsn"], settings=spec["settings"], schema=spec["schema"], role=spec["role"]
        )
        for name, spec in tenants.items()
    }
    counts: dict[str, Any] = {"ok": 0, "mismatches": 0, "timeouts": 0, "errors": []}
    pool = PoolSettings(
        max_size=config["max_size"],
        acquire_timeout=config["acquire_timeout"],
        state_scope="transaction",
    )
    async with TenantPoolManager(
        resolver, pool=pool, max_total_connections=config["cap"]
    ) as manager:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        rng = random.Random(config["seed"])

        async def worker() -> None:
            for _ in range(config["checkouts_per_task"]):
                tenant = rng.choice(list(tenants))
                try:
                    async with manager.with_connection(tenant) as conn:
                        row = await conn.fetchrow(config["check_sql"])
                        await conn.execute("SELECT pg_catalog.pg_sleep($1)", config["hold"])
                except PoolTimeout:
                    counts["timeouts"] += 1
                    continue
                except Exception as exc:
                    counts["errors"].append(f"{type(exc).__name__}: {exc}")
                    continue
                if list(row) == tenants[tenant]["expected"]:
                    counts["ok"] += 1
                else:
                    counts["mismatches"] += 1

        await asyncio.gather(*(worker() for _ in range(config["tasks"])))
    return counts


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
