"""The README's first example runs as written and prints what the README says; every Python
block in the README and docs/ at least compiles, and every link between them leads somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _postgres import PostgresCluster

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def first_example() -> tuple[str, str]:
    """The README's first example and the output it shows."""
    text = README.read_text()
    start = text.index("\n## A first example\n")
    section = text[start : text.index("\n## ", start + 1)]
    [code] = blocks(section, "python")
    [output] = blocks(section, "text")
    return code, output


def same_output(actual: str, shown: str) -> bool:
    """``actual`` is what the README shows, where ``...`` stands for anything on its line."""
    pattern = ".*".join(re.escape(part) for part in shown.split("..."))
    return re.fullmatch(pattern, actual) is not None


def run_example(code: str, dsn: str, cwd: Path) -> str:
    script = cwd / "first.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env={
            **os.environ,
            "DATABASE_URL": dsn,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_first_example_runs_and_prints_what_the_readme_shows(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    code, shown = first_example()
    assert 'os.environ["DATABASE_URL"]' in code
    database = pg.create_database_sync(f"first_{os.getpid()}")
    dsn = pg.dsn(database=database)
    try:
        assert same_output(run_example(code, dsn, tmp_path), shown)
        # Run again: its set-up starts afresh, so the output is the same.
        assert same_output(run_example(code, dsn, tmp_path), shown)
    finally:
        pg.drop_database_sync(database)
        pg.execute_sync("DROP ROLE IF EXISTS tp_app")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_block_compiles(page: Path) -> None:
    for code in blocks(page.read_text(), "python"):
        if code.lstrip().startswith(("async with", "await ")) or "\nasync with " in code:
            # A fragment shown inside a coroutine: compile it as one.
            code = "async def _fragment():\n" + "".join(
                f"    {line}\n" for line in code.splitlines()
            )
        compile(code, str(page), "exec")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_local_link_leads_somewhere(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name} links to {target}, which is missing"


def test_the_readme_and_the_index_link_every_page() -> None:
    pages = {p.name for p in PAGES if p != README}
    pages.discard("index.md")
    readme = README.read_text()
    index = (REPO / "docs" / "index.md").read_text()
    for name in pages - {"demo.md"}:
        assert f"](docs/{name})" in readme, name
    for name in pages:
        assert f"]({name})" in index, name
