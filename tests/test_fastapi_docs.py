"""docs/fastapi.md's apps run as written, and the package keeps its optional imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _asgi import serve
from _postgres import PostgresCluster

import tenantpool.fastapi

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "fastapi.md"
DOC_DSN = "postgresql://app:secret@localhost:5432/app"


def snippets() -> list[str]:
    """The python blocks of docs/fastapi.md, before its first subsection."""
    text = PAGE.read_text()
    section = text[: text.index("\n## ")]
    return re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)


def run_snippet(code: str, dsn: str) -> Any:
    assert code.count(DOC_DSN) == 1
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    exec(compile(code.replace(DOC_DSN, dsn), str(PAGE), "exec"), namespace)
    return namespace["app"]


def test_the_page_opens_with_a_short_fastapi_app_and_a_starlette_one() -> None:
    fastapi_app, starlette_app = snippets()
    assert "from fastapi import FastAPI" in fastapi_app
    assert len(fastapi_app.splitlines()) < 25
    assert "from starlette.applications import Starlette" in starlette_app


async def test_the_fastapi_snippet_runs(pg: PostgresCluster) -> None:
    app = run_snippet(snippets()[0], pg.dsn())
    async with serve(app) as (client, _):
        response = await client.get("/whoami", headers={"X-Tenant-ID": "globex"})
        assert response.json() == {"tenant": "globex", "setting": "globex"}
        assert (await client.get("/whoami", headers={"X-Tenant-ID": "nobody"})).status_code == 404
        assert (await client.get("/whoami")).status_code == 400
        assert (await client.get("/health")).json()["status"] == "ok"
        metrics = (await client.get("/metrics")).text
        assert "tenantpool_checkouts_total 1.0" in metrics
        assert "tenantpool_max_connections 20.0" in metrics
        assert pg.superuser_password not in metrics


async def test_the_starlette_snippet_runs(pg: PostgresCluster) -> None:
    app = run_snippet(snippets()[1], pg.dsn())
    async with serve(app, base_url="http://acme.example.com") as (client, _):
        assert (await client.get("/whoami")).json() == {"setting": "acme"}
        response = await client.get("http://globex.example.com/whoami")
        assert response.json() == {"setting": "globex"}
        assert (await client.get("http://example.com/whoami")).status_code == 400
        assert (await client.get("http://nobody.example.com/whoami")).status_code == 404
        assert (await client.get("/health")).status_code == 200


def test_all_is_sorted_and_honest() -> None:
    names = tenantpool.fastapi.__all__
    assert list(names) == sorted(names)
    public = {
        name
        for name, value in vars(tenantpool.fastapi).items()
        if not name.startswith("_") and not isinstance(value, type(tenantpool))
    }
    assert public == set(names)
    import tenantpool.fastapi.metrics as metrics

    assert list(metrics.__all__) == sorted(metrics.__all__)
    for name in metrics.__all__:
        assert hasattr(metrics, name)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_optional_dependencies_stay_optional() -> None:
    # tenantpool alone imports none of the web or metrics libraries; tenantpool.fastapi works
    # without prometheus_client, and its metrics module says what to install.
    proc = run_python(
        "import sys\n"
        "import tenantpool\n"
        "loaded = {'fastapi', 'starlette', 'prometheus_client'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
        "sys.modules['prometheus_client'] = None  # as if it were not installed\n"
        "import tenantpool.fastapi\n"
        "try:\n"
        "    import tenantpool.fastapi.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "tenantpool[prometheus]" in proc.stdout
