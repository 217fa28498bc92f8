"""Shared fixtures: a real throwaway PostgreSQL cluster for the whole session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from _pgbouncer import PgBouncerMissing, find_pgbouncer
from _postgres import PostgresCluster, unique_name

__all__ = ["PostgresCluster", "unique_name"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL cluster (or the TENANTPOOL_TEST_DSN server)."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def restartable_pg(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """The session cluster, for tests that stop/start it; skipped on an external server.

    After the test the server is brought back up if the test left it stopped.
    """
    if not pg.can_restart:
        pytest.skip("needs a restartable server; TENANTPOOL_TEST_DSN points at an external one")
    try:
        yield pg
    finally:
        if not pg.is_running():
            pg.start_again()


@pytest.fixture
async def login(pg: PostgresCluster) -> AsyncIterator[tuple[str, str]]:
    """A login role of the test's own, ``(name, password)``: server-side views can single out
    this test's connections by user name."""
    name, password = unique_name("login"), "pw-" + unique_name()
    await pg.create_role(name, password)
    yield name, password
    await pg.drop_role(name)


@pytest.fixture
def login_dsn(pg: PostgresCluster, login: tuple[str, str]) -> str:
    return pg.dsn(*login)


@pytest.fixture(scope="session")
def pgbouncer_binary() -> str:
    """The ``pgbouncer`` binary; skips where it is missing, except under CI, which installs it
    (``.ci/run``) and where a skip would hide the transaction-pooling tests."""
    try:
        return find_pgbouncer()
    except PgBouncerMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
