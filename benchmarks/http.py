"""HTTP: one FastAPI endpoint, hand-rolled (asyncpg.Pool + set_config) vs. tenantpool's dependency.

Both apps (``benchmarks/_http_apps.py``) serve ``GET /notes``: the requesting tenant's rows of
a shared table under row-level security, the tenant from ``X-Tenant-ID``. Each runs under
uvicorn in a process of its own for the whole scenario; a load generator in another process
(wrk if installed, else ``python -m benchmarks.http``'s httpx client) rotates the header over
the tenants and alternates between the two servers round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx

from demo_api._local_postgres import free_port

from ._harness import (
    ROOT,
    Context,
    Goal,
    PostgresCluster,
    Report,
    interleave,
    median,
    percentile,
    ratio,
    table,
)

TITLE = "4. HTTP: a FastAPI endpoint, hand-rolled asyncpg.Pool + set_config vs. tenantpool"

TENANTS = [f"tenant{i}" for i in range(8)]
NOTES_PER_TENANT = 5
POOL_SIZE = 10
# More client connections than pooled ones, so requests also queue for a connection.
CONNECTIONS = 32
HANDROLLED = "hand-rolled asyncpg.Pool + set_config, in the endpoint"
HANDROLLED_DEP = "hand-rolled asyncpg.Pool + set_config, as a dependency"
TENANTPOOL = "tenantpool, RequestConnection"
TENANTPOOL_ENDPOINT = "tenantpool, EndpointConnection (a `yield` dependency)"
APPS = {
    HANDROLLED: "handrolled",
    HANDROLLED_DEP: "handrolled_dependency",
    TENANTPOOL: "tenantpool_app",
    TENANTPOOL_ENDPOINT: "tenantpool_endpoint_app",
}
# Same for both servers, and spelled out: "auto" would switch to uvloop/httptools if present.
UVICORN = ["--loop", "asyncio", "--http", "h11", "--no-access-log", "--log-level", "warning"]

# wrk cycles through prebuilt requests, one per tenant, and reports through done() as JSON so
# nothing depends on its human-readable summary. errors.status counts responses >= 400.
WRK_SCRIPT = """
local tenants = {%s}
local prebuilt, turn = {}, 0
function init(args)
  for i, tenant in ipairs(tenants) do
    prebuilt[i] = wrk.format("GET", "/notes", {["X-Tenant-ID"] = tenant})
  end
end
function request()
  turn = turn %% #prebuilt + 1
  return prebuilt[turn]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p99_ms": %%f, "status_errors": %%d,'
    .. ' "socket_errors": %%d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def expected_notes(tenant: str, tenants: Sequence[str] = TENANTS) -> list[dict[str, Any]]:
    """The notes ``rls_table``-style seeding gives ``tenant``: ids in tenant order."""
    start = tenants.index(tenant) * NOTES_PER_TENANT + 1
    return [
        {"id": i, "tenant": tenant, "body": f"note {i} of {tenant}"}
        for i in range(start, start + NOTES_PER_TENANT)
    ]


def seed_notes(
    pg: PostgresCluster,
    table_name: str,
    roles: Sequence[str],
    who: str,
    tenants: Sequence[str] = TENANTS,
) -> None:
    """Create ``table_name`` under FORCE ROW LEVEL SECURITY (rows whose tenant is ``who``, an
    SQL expression), readable by ``roles``, with ``NOTES_PER_TENANT`` notes per tenant."""
    grants = "".join(f"GRANT SELECT ON {table_name} TO {role};" for role in roles)
    pg.execute_sync(
        f"""
        CREATE TABLE {table_name} (id int PRIMARY KEY, tenant text NOT NULL, body text);
        ALTER TABLE {table_name} ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {table_name} FORCE ROW LEVEL SECURITY;
        CREATE POLICY by_tenant ON {table_name} USING (tenant = {who});
        {grants}
        INSERT INTO {table_name}
            SELECT n, 'tenant' || ((n - 1) / {NOTES_PER_TENANT}),
                   'note ' || n || ' of tenant' || ((n - 1) / {NOTES_PER_TENANT})
            FROM generate_series(1, {len(tenants) * NOTES_PER_TENANT}) AS n;
        """
    )


def wrk_script(folder: str, tenants: Sequence[str] = TENANTS) -> Path | None:
    """The wrk script rotating ``tenants``, written in ``folder``; None without wrk."""
    if not shutil.which("wrk"):
        return None
    script = Path(folder) / "rotate.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{t}"' for t in tenants))
    return script


@contextlib.contextmanager
def rls_table(ctx: Context) -> Iterator[tuple[str, str]]:
    """A shared notes table under FORCE ROW LEVEL SECURITY; yields it and the app role's DSN."""
    pg = ctx.shared
    role, table_name, password = (
        PostgresCluster.unique_name("http_app"),
        PostgresCluster.unique_name("http_notes"),
        "bench-pw",
    )
    pg.create_role_sync(role, password=password)
    try:
        seed_notes(pg, table_name, [role], "current_setting('app.tenant_id', true)")
        yield table_name, pg.dsn(user=role, password=password)
    finally:
        pg.execute_sync(f"DROP TABLE IF EXISTS {table_name}")
        pg.drop_role_sync(role)


@contextlib.contextmanager
def server(
    factory: str, env: dict[str, str], module: str = "benchmarks._http_apps"
) -> Iterator[str]:
    """uvicorn serving ``factory`` in a process of its own; yields its URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", f"{module}:{factory}", "--factory"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), *UVICORN],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so nothing it spawns outlives us
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(proc, url, log)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)  # a graceful stop runs the lifespan: pools close
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_until_serving(proc: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{log.read().decode()}")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"{url}/notes", headers={"X-Tenant-ID": TENANTS[0]}, timeout=2)
            return
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn at {url} did not answer within 30 s")


def check_rows(client: httpx.Client, name: str, tenants: Sequence[str]) -> None:
    """Refuse to measure an endpoint that serves any tenant the wrong rows."""
    for tenant in tenants:
        got = client.get("/notes", headers={"X-Tenant-ID": tenant})
        if got.status_code != 200 or got.json() != expected_notes(tenant, tenants):
            raise AssertionError(f"{name}: {tenant} got {got.status_code} {got.text[:200]}")


def check(name: str, url: str) -> None:
    """Refuse to measure an endpoint that serves the wrong rows or the wrong errors."""
    with httpx.Client(base_url=url, timeout=5) as client:
        check_rows(client, name, TENANTS)
        for headers, status in (({}, 400), ({"X-Tenant-ID": "no such!"}, 400),
                                ({"X-Tenant-ID": "nobody"}, 404)):  # fmt: skip
            got = client.get("/notes", headers=headers)
            if got.status_code != status or "detail" not in got.json():
                raise AssertionError(f"{name}: {headers} got {got.status_code}, not {status}")


async def load(url: str, seconds: int, script: Path | None) -> dict[str, Any]:
    """One load of ``seconds`` from a separate process: wrk with ``script``, else httpx."""
    if script is not None:
        command = [shutil.which("wrk") or "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s"]
        command += ["--latency", "-s", str(script), f"{url}/notes"]
    else:
        command = [sys.executable, "-m", "benchmarks.http", url, str(seconds)]
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["rps"] = result["requests"] / result["seconds"]
    result["errors"] = result["status_errors"] + result["socket_errors"]
    return result


def run(ctx: Context) -> Report:
    seconds, warmup = ctx.pick(3, 5), ctx.pick(1, 2)
    with tempfile.TemporaryDirectory() as tmp, rls_table(ctx) as (notes_table, dsn):
        script = wrk_script(tmp)
        env = {
            **os.environ,
            "BENCH_HTTP_DSN": dsn,
            "BENCH_HTTP_TABLE": notes_table,
            "BENCH_HTTP_TENANTS": ",".join(TENANTS),
            "BENCH_HTTP_POOL": str(POOL_SIZE),
        }
        with contextlib.ExitStack() as servers:
            urls = {name: servers.enter_context(server(app, env)) for name, app in APPS.items()}
            for name, url in urls.items():
                check(name, url)

            async def measure() -> dict[str, list[dict[str, Any]]]:
                for url in urls.values():
                    await load(url, warmup, script)
                contenders = {
                    name: partial(load, url, seconds, script) for name, url in urls.items()
                }
                return await interleave(ctx.rounds, contenders)

            results = asyncio.run(measure())

    summary = {
        name: {
            "rps": median([r["rps"] for r in rounds]),
            "p50_ms": median([r["p50_ms"] for r in rounds]),
            "p99_ms": median([r["p99_ms"] for r in rounds]),
            "errors": sum(r["errors"] for r in rounds),
        }
        for name, rounds in results.items()
    }
    base = summary[HANDROLLED]["rps"]
    speedup = ratio(summary[TENANTPOOL]["rps"], base)
    like_for_like = ratio(summary[TENANTPOOL_ENDPOINT]["rps"], summary[HANDROLLED_DEP]["rps"])
    errors = sum(s["errors"] for s in summary.values())
    rows = [
        [name, f"{s['rps']:,.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", s["errors"],
         f"{ratio(s['rps'], base):.2f}x"]
        for name, s in summary.items()
    ]  # fmt: skip
    generator = "wrk, 1 thread" if script else "httpx.AsyncClient in a second process"
    notes = [
        f"`GET /notes` (a tenant's {NOTES_PER_TENANT} rows of a shared table under FORCE ROW"
        f" LEVEL SECURITY) over {len(TENANTS)} tenants rotated per request; load generator:"
        f" {generator}, {CONNECTIONS} connections, {seconds} s per round after {warmup} s of"
        f" warm-up per server. uvicorn, one worker each, `{' '.join(UVICORN)}`; every pool holds"
        f" {POOL_SIZE} connections. Req/s, p50 and p99 are medians over rounds; errors are"
        " responses >= 400 and socket errors summed over rounds.",
    ]
    if script is None:
        notes.append(
            "Without wrk the generator is an httpx client, slower than either server: it may"
            " bound both contenders alike, pulling the ratio towards 1."
        )
    if errors:
        notes.append(f"**{errors} requests failed**: the goal counts as missed.")
    return Report(
        name="http",
        title=TITLE,
        table=table(["contender", "req/s", "p50 ms", "p99 ms", "errors", "vs hand-rolled"], rows),
        goals=[
            Goal(
                "tenantpool (RequestConnection) >= 1.0x the hand-rolled asyncpg.Pool +"
                " set_config endpoint in requests per second",
                met=speedup >= 1.0 and not errors,
                detail=f"{speedup:.2f}x",
            ),
            Goal(
                "like for like: EndpointConnection >= 1.0x the hand-rolled `yield` dependency",
                met=like_for_like >= 1.0 and not errors,
                detail=f"{like_for_like:.2f}x",
            ),
        ],
        data={
            "generator": "wrk" if script else "httpx",
            "connections": CONNECTIONS,
            "pool_size": POOL_SIZE,
            "tenants": len(TENANTS),
            "seconds_per_round": seconds,
            "uvicorn": UVICORN,
            "ratio": speedup,
            "ratio_dependency": like_for_like,
            "summary": summary,
            "rounds": results,
        },
        notes=notes,
        plot=partial(plot, {name: [r["rps"] for r in rounds] for name, rounds in results.items()}),
    )


def plot(series: dict[str, list[float]], ax: Any) -> None:
    rounds = range(1, 1 + max(len(values) for values in series.values()))
    for name, values in series.items():
        ax.plot(rounds[: len(values)], values, marker="o", label=name)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("requests per second")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")


async def httpx_load(url: str, seconds: float) -> dict[str, Any]:
    """The fallback generator: CONNECTIONS clients in a loop, tenants rotated per request."""
    latencies: list[float] = []
    status_errors = socket_errors = 0
    turn = itertools.count()
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop() -> None:
            nonlocal status_errors, socket_errors
            while (sent := time.perf_counter()) < deadline:
                tenant = TENANTS[next(turn) % len(TENANTS)]
                try:
                    response = await client.get("/notes", headers={"X-Tenant-ID": tenant})
                except httpx.TransportError:
                    socket_errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                status_errors += not 200 <= response.status_code < 300

        await asyncio.gather(*(client_loop() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies) + socket_errors,
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "status_errors": status_errors,
        "socket_errors": socket_errors,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the httpx load generator: prints JSON")
    parser.add_argument("url")
    parser.add_argument("seconds", type=float)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(httpx_load(args.url, args.seconds))))
