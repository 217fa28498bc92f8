"""docs/deployment.md's snippet runs as written through a PgBouncer configured as it shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from _pgbouncer import PgBouncer
from _postgres import PostgresCluster

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
DOC_DSN = "postgresql://app:secret@127.0.0.1:6432/app"


def block(language: str) -> str:
    (found,) = re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), re.S | re.M)
    return str(found)


def ini_settings() -> dict[str, str]:
    pairs = re.findall(r"^(\w+)\s*=\s*(.+?)\s*$", block("ini"), re.M)
    return dict(pairs)


def test_the_ini_excerpt_is_transaction_pooling_with_one_ceiling() -> None:
    settings = ini_settings()
    assert settings["pool_mode"] == "transaction"
    assert settings["max_db_connections"] == settings["default_pool_size"]


async def test_the_snippet_runs_through_pgbouncer_configured_as_documented(
    pg: PostgresCluster, login: tuple[str, str], pgbouncer_binary: str
) -> None:
    with PgBouncer(pg, {login[0]: login[1]}, settings=ini_settings()) as bouncer:
        code = block("python")
        assert code.count(DOC_DSN) == 1
        namespace: dict[str, Any] = {"__name__": "deployment_snippet"}
        exec(compile(code.replace(DOC_DSN, bouncer.dsn(*login)), str(DOC), "exec"), namespace)
        assert await namespace["main"]() == ["acme", "globex", "acme"]
