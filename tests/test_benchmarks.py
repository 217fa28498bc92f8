"""The benchmark runner end to end, small: so ``python -m benchmarks`` cannot rot unnoticed.

No timing is asserted here: figures belong to the benchmark report, never to the suite.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from benchmarks import __main__ as runner
from benchmarks._harness import interleave, percentile, table

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parent.parent


# The bench extra (psycopg, psycopg-pool, matplotlib) is not the test suite's: with `.[dev]`
# alone the runner is checked on what it can run without it.
HAS_PSYCOPG = all(importlib.util.find_spec(m) for m in ("psycopg", "psycopg_pool"))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("name", runner.SCENARIOS)
def test_every_scenario_has_a_title_and_a_run(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.TITLE
    assert callable(module.run)


async def test_interleave_runs_contenders_round_by_round() -> None:
    calls: list[str] = []

    def contender(name: str) -> Callable[[], Awaitable[str]]:
        async def measure() -> str:
            calls.append(name)
            return name

        return measure

    results = await interleave(3, {"a": contender("a"), "b": contender("b")})
    assert calls == ["a", "b"] * 3
    assert results == {"a": ["a"] * 3, "b": ["b"] * 3}


def test_percentile_and_table() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 99) == 0.0
    assert table(["a", "b"], [["x", 1]]) == "| a | b |\n|---|---:|\n| x | 1 |"


def test_the_runner_names_the_bench_extra_when_a_package_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    lacking = {"psycopg", "psycopg_pool", "matplotlib"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in lacking else real(name)
    )
    assert runner.missing(["cap_cost", "reconnect"], plots=False) is None
    assert runner.main(["--only", "checkout", "cap_cost"]) == 2  # before any cluster starts
    error = capsys.readouterr().err
    assert "checkout needs psycopg, psycopg_pool; plots needs matplotlib" in error
    assert 'pip install -e ".[bench]"' in error


def test_runner_writes_report_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    scenarios = ["checkout", "cap_cost"] if HAS_PSYCOPG else ["cap_cost"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--rounds",
            "1",
            "--only",
            *scenarios,
            "--out",
            str(out),
            *([] if HAS_MATPLOTLIB else ["--no-plots"]),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "### 7. Cost of the cap" in report
    data = json.loads((out / "results.json").read_text())
    assert set(data["scenarios"]) == set(scenarios)
    assert data["machine"]["postgresql"]
    if HAS_PSYCOPG:
        assert "### 1. Checkout latency" in report
        assert "| tenantpool (RLS setting) |" in report
        # Every contender was measured, in every round asked for.
        for values in data["scenarios"]["checkout"]["us_per_cycle"].values():
            assert len(values) == 1 and values[0] > 0
        assert [g["text"] for g in data["goals"]["checkout"]] == [
            "tenantpool ≤ 0.75x asyncpg.Pool",
            "tenantpool ≤ 1.3x a bare connection",
            "a lone task: tenantpool ≤ 1.0x asyncpg.Pool",
            "a lone task: tenantpool ≤ 1.3x a bare connection",
            "a lone task holds ≤ 2 connections",
        ]
    for name in scenarios:
        plotted = out / f"{name}.png"
        if HAS_MATPLOTLIB:
            assert plotted.read_bytes().startswith(b"\x89PNG")
        else:
            assert not plotted.exists()
