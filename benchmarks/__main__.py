"""``python -m benchmarks [--quick] [--only NAME ...] [--rounds N] [--out DIR] [--no-plots]``

Needs the bench extra (``pip install -e ".[dev,bench]"``: psycopg and psycopg-pool for the peers
measured against, matplotlib for the plots); it says what is missing before it starts.

Starts a throwaway PostgreSQL cluster (the test suite's harness), runs every scenario with its
contenders interleaved round by round, prints markdown tables of medians and ratios, and writes
``report.md``, ``results.json`` and one PNG plot per scenario under the output folder
(``benchmarks/results/``, or ``benchmarks/results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ._harness import Context, PostgresCluster, Report

SCENARIOS = (
    "checkout",
    "throughput",
    "many_tenants",
    "http",
    "reconnect",
    "memory",
    "cap_cost",
    "transaction_mode",
    "noisy_neighbour",
    "sqlalchemy",
    "bursts",
    "overload",
    "reset_cost",
)
# What the bench extra (pip install -e ".[bench]") brings, by who needs it; the rest of the
# runner needs only what the test suite has.
NEEDS = {
    "checkout": ("psycopg", "psycopg_pool"),
    "throughput": ("psycopg", "psycopg_pool"),
    "many_tenants": ("psycopg",),
    "plots": ("matplotlib",),
}
HERE = Path(__file__).resolve().parent


def machine(pg: PostgresCluster) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in (
        "asyncpg",
        "psycopg",
        "psycopg-pool",
        "fastapi",
        "uvicorn",
        "sqlalchemy",
        "fastapi-tenancy",
        "tenantpool",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg.fetchval_sync("SHOW server_version"),
        "postgresql_source": pg.source,
        "packages": versions,
    }


def describe(info: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    return (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB;"
        f" {info['os']}; Python {info['python']}; PostgreSQL {info['postgresql']}"
        f" ({info['postgresql_source']}, loopback TCP); {packages}"
    )


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert report.plot is not None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    report.plot(ax)
    ax.set_title(report.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def missing(names: list[str], plots: bool) -> str | None:
    """What the chosen run lacks of the bench extra, said as an error; None if nothing."""
    wanted = {n: NEEDS.get(n, ()) for n in [*names, *(["plots"] if plots else [])]}
    lacking = {
        name: [m for m in modules if importlib.util.find_spec(m) is None]
        for name, modules in wanted.items()
    }
    lacking = {name: mods for name, mods in lacking.items() if mods}
    if not lacking:
        return None
    needs = "; ".join(f"{name} needs {', '.join(mods)}" for name, mods in lacking.items())
    return (
        f'python -m benchmarks: {needs}. Install the bench extra: pip install -e ".[bench]"'
        " (or leave those out: --only NAME ..., --no-plots)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 3 minutes")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3 quick, 11 full)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib)")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    problem = missing(names, plots=not args.no_plots)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2

    out = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (3 if args.quick else 11)
    modules: list[ModuleType] = [importlib.import_module(f"benchmarks.{n}") for n in names]

    reports: list[Report] = []
    started = time.monotonic()
    with PostgresCluster() as pg:
        info = machine(pg)
        print(f"Machine: {describe(info)}\n", flush=True)
        ctx = Context(quick=args.quick, rounds=rounds, out_dir=out, shared=pg)
        for name, module in zip(names, modules, strict=True):
            t0 = time.monotonic()
            print(f"## {module.TITLE} ...", file=sys.stderr, flush=True)
            report: Report = module.run(ctx)
            report.data["seconds"] = round(time.monotonic() - t0, 1)
            reports.append(report)
            print(report.markdown() + "\n", flush=True)
            if report.plot is not None and not args.no_plots:
                plot(report, out / f"{name}.png")

    mode = "--quick" if args.quick else "full"
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    header = [
        "# tenantpool benchmarks",
        "",
        f"Mode: {mode}, {rounds} rounds per scenario, {time.monotonic() - started:.0f} s in all."
        f" Command: `{command}`.",
        "",
        f"Machine: {describe(info)}.",
        "",
    ]
    body = "\n\n".join(r.markdown() for r in reports)
    (out / "report.md").write_text("\n".join(header) + body + "\n")
    payload = {
        "mode": mode,
        "rounds": rounds,
        "machine": info,
        "scenarios": {r.name: {"title": r.title, **r.data} for r in reports},
        "goals": {r.name: [g.__dict__ for g in r.goals] for r in reports},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    elapsed = time.monotonic() - started
    print(f"Wrote {out / 'report.md'}, results.json and plots in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
