"""Scenario 13: the reset's server CPU, statement by statement, against asyncpg.Pool's reset.

Twenty connections (as in the throughput scenario) each run one script in a loop for a while;
the backends' own CPU time per script is read from ``/proc/<pid>/schedstat`` (nanoseconds on
CPU, per process), and this process's CPU time gives the client's. Contenders: a ``SELECT 1``
round trip (the floor of any round trip), asyncpg.Pool's reset, tenantpool's reset for the
throughput scenario's tenant, and each statement of the latter alone, once and six times in one
script: its cost is a fifth of the difference, and what is left of the single run is the round
trip's own (receiving, parsing, answering). Then both resets again with 50 statements in
asyncpg's statement cache: the guard against SQL-level prepared statements reads
``pg_prepared_statements``, whose every row (asyncpg's own statements included) costs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg

from tenantpool import _session

from ._harness import Context, Report, interleave, median, table

TITLE = "13. Where the reset's server CPU goes: tenantpool's and asyncpg.Pool's, per statement"
CONNECTIONS = 20
CACHED = 50
REPEAT = 6
STATE = (("app.tenant_id", "acme"),)  # the throughput scenario's tenant
ASYNCPG_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
ROUND_TRIP = "SELECT 1 (extended protocol)"
ASYNCPG = "asyncpg.Pool's reset"
OURS = "tenantpool's reset"


def run(ctx: Context) -> Report:
    seconds = ctx.pick(0.3, 0.5)
    results, statements = asyncio.run(_measure(ctx.shared.dsn(), ctx.rounds, seconds))
    server = {name: median([r[0] for r in runs]) for name, runs in results.items()}
    client = {name: median([r[1] for r in runs]) for name, runs in results.items()}
    rows = [
        [name, f"{server[name]:.1f}", f"{client[name]:.1f}"]
        for name in (
            ROUND_TRIP,
            ASYNCPG,
            OURS,
            f"{ASYNCPG}, {CACHED} cached",
            f"{OURS}, {CACHED} cached",
        )
    ]
    shares = {s: (server[f"{s} x{REPEAT}"] - server[s]) / (REPEAT - 1) for s in statements}
    floor = median([server[s] - share for s, share in shares.items()])
    rows += [[f"… `{s}`", f"{share:.1f}", ""] for s, share in shares.items()]
    rows.append(["… the simple-query round trip itself", f"{floor:.1f}", ""])
    return Report(
        name="reset_cost",
        title=TITLE,
        table=table(["script", "server CPU µs per run", "client CPU µs per run"], rows),
        notes=[
            f"{CONNECTIONS} connections looping the same script for {seconds:g} s per contender"
            f" per round, {ctx.rounds} rounds interleaved; medians. Server CPU: the"
            " backends' own (schedstat), not the postmaster's other processes. A statement's"
            f" share: its script repeated {REPEAT} times less it alone, over {REPEAT - 1}; the"
            " round trip: a script of one statement less that statement's share (median over"
            " the statements). Noise: about ±2 µs a row."
        ],
        data={"seconds": seconds, "runs": results, "server_us": server, "client_us": client},
        plot=lambda ax: _plot(ax, server, shares),
    )


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return total / 1e9


async def _measure(
    dsn: str, rounds: int, seconds: float
) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    ours = _session.reset_script(STATE, in_transaction=False, guard_ready=True, deallocate=False)
    statements = [s.strip() + ";" for s in ours.split(";") if s.strip()]
    plain = [await asyncpg.connect(dsn) for _ in range(CONNECTIONS)]
    cached = [await asyncpg.connect(dsn) for _ in range(CONNECTIONS)]
    try:
        for conn in plain + cached:
            # The guard is prepared once per connection, by its first reset.
            first = _session.reset_script(
                STATE, in_transaction=False, guard_ready=False, deallocate=False
            )
            await conn.execute(first)
        for conn in cached:
            for i in range(CACHED):
                await conn.fetchval(f"SELECT $1::int + {i}", i)

        def loop(conns: list[asyncpg.Connection], script: str | None) -> Any:
            async def measure() -> tuple[float, float]:
                pids = [c.get_server_pid() for c in conns]
                done = 0
                stop = time.perf_counter() + seconds

                async def one(conn: asyncpg.Connection) -> None:
                    nonlocal done
                    while time.perf_counter() < stop:
                        if script is None:
                            await conn.fetchval("SELECT 1")
                        else:
                            await conn.execute(script)
                        done += 1

                server, client = _cpu(pids), time.process_time()
                await asyncio.gather(*(one(c) for c in conns))
                return (
                    (_cpu(pids) - server) / done * 1e6,
                    (time.process_time() - client) / done * 1e6,
                )

            return measure

        contenders = {
            ROUND_TRIP: loop(plain, None),
            ASYNCPG: loop(plain, ASYNCPG_RESET),
            OURS: loop(plain, ours),
            f"{ASYNCPG}, {CACHED} cached": loop(cached, ASYNCPG_RESET),
            f"{OURS}, {CACHED} cached": loop(cached, ours),
        }
        for s in statements:
            contenders[s] = loop(plain, s)
            contenders[f"{s} x{REPEAT}"] = loop(plain, s * REPEAT)
        results = await interleave(rounds, contenders)
    finally:
        await asyncio.gather(*(c.close() for c in plain + cached))
    return results, statements


def _plot(ax: Any, server: dict[str, float], shares: dict[str, float]) -> None:
    names = [ROUND_TRIP, ASYNCPG, OURS, *(s[:40] for s in shares)]
    values = [server[ROUND_TRIP], server[ASYNCPG], server[OURS], *shares.values()]
    ax.barh(names, values, color=["#999999", "#4c72b0", "#dd8452", *["#55a868"] * len(shares)])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("server CPU µs per script (20 connections); green: a statement's share")
