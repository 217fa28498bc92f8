"""Proves the PostgreSQL test harness itself works (real server, no mocks)."""

from __future__ import annotations

import asyncpg
import pytest
from _postgres import PostgresCluster, unique_name

pytestmark = pytest.mark.anyio


async def test_server_answers_version(pg: PostgresCluster) -> None:
    version = await pg.fetchval("SELECT version()")
    assert isinstance(version, str)
    assert version.startswith("PostgreSQL")


async def test_max_connections_and_scram(pg: PostgresCluster) -> None:
    if pg.external:
        pytest.skip("settings of an external server are not ours")
    assert await pg.fetchval("SHOW max_connections") == "300"
    assert await pg.fetchval("SHOW fsync") == "off"
    assert await pg.fetchval("SHOW password_encryption") == "scram-sha-256"


async def test_role_with_password_can_log_in_and_wrong_password_is_refused(
    pg: PostgresCluster,
) -> None:
    role = unique_name("harness_role")
    password = "s3cr'et pa:ss@/word"
    await pg.create_role(role, password=password)
    try:
        conn = await asyncpg.connect(pg.dsn(role, password), timeout=10)
        try:
            assert await conn.fetchval("SELECT current_user") == role
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(pg.dsn(role, "wrong-password"), timeout=10)
    finally:
        await pg.drop_role(role)
    assert await pg.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role) == 0


async def test_create_database_and_schema(pg: PostgresCluster) -> None:
    owner = unique_name("Owner-Role")  # quoting: the prefix gets normalised
    db = unique_name("harness_db")
    schema = unique_name("harness_schema")
    await pg.create_role(owner, password="pw")
    try:
        await pg.create_database(db, owner=owner)
        await pg.create_database(db, exist_ok=True)  # idempotent-friendly
        assert (
            await pg.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", db
            )
            == owner
        )
        await pg.create_schema(schema, database=db, owner=owner)
        await pg.create_schema(schema, database=db, owner=owner)  # IF NOT EXISTS
        await pg.execute(f'CREATE TABLE "{schema}".t (id int)', database=db)
        await pg.execute(f'INSERT INTO "{schema}".t VALUES ($1)', 42, database=db)
        assert await pg.fetchval(f'SELECT id FROM "{schema}".t', database=db) == 42
        rows = await pg.fetch(
            "SELECT nspname, pg_get_userbyid(nspowner) AS owner FROM pg_namespace"
            " WHERE nspname = $1",
            schema,
            database=db,
        )
        assert [(r["nspname"], r["owner"]) for r in rows] == [(schema, owner)]
        # the new owner can log in to its own database
        conn = await asyncpg.connect(pg.dsn(owner, "pw", db), timeout=10)
        try:
            assert await conn.fetchval("SELECT current_database()") == db
        finally:
            await conn.close()
        await pg.drop_schema(schema, database=db)
    finally:
        await pg.drop_database(db)
        await pg.drop_role(owner)
    assert await pg.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", db) == 0


def test_sync_helpers(pg: PostgresCluster) -> None:
    name = unique_name("sync_db")
    pg.create_database_sync(name)
    try:
        assert pg.fetchval_sync("SELECT 1", database=name) == 1
        assert pg.execute_sync("SELECT 1") == "SELECT 1"
    finally:
        pg.drop_database_sync(name)


def test_unique_name() -> None:
    names = {unique_name("Tenant-X") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name == name.lower()
        assert name.startswith("tenant_x_")
        assert len(name) <= 63
    assert len(unique_name("x" * 200)) <= 63
    assert unique_name("1abc")[0].isalpha()


async def test_stop_refuses_connections_and_start_again_keeps_data(
    restartable_pg: PostgresCluster,
) -> None:
    pg = restartable_pg
    table = unique_name("survivor")
    await pg.execute(f'CREATE TABLE "{table}" (v text)')
    await pg.execute(f'INSERT INTO "{table}" VALUES ($1)', "still here")
    try:
        pg.stop()
        assert not pg.is_running()
        with pytest.raises(OSError):  # ConnectionRefusedError is an OSError
            await asyncpg.connect(pg.superuser_dsn, timeout=5)
        pg.start_again()
        assert pg.is_running()
        assert await pg.fetchval(f'SELECT v FROM "{table}"') == "still here"
        pg.restart(mode="immediate")  # crash-style stop; recovery keeps committed data
        assert await pg.fetchval(f'SELECT v FROM "{table}"') == "still here"
    finally:
        if pg.is_running():
            await pg.execute(f'DROP TABLE IF EXISTS "{table}"')


def test_external_cluster_is_not_restartable() -> None:
    from _postgres import ClusterNotRestartableError

    ext = PostgresCluster(external_dsn="postgresql://admin:p%40ss@db.example:6543/postgres")
    assert not ext.can_restart
    assert ext.superuser == "admin"
    assert ext.superuser_password == "p@ss"
    assert ext.dsn(database="x") == "postgresql://admin:p%40ss@db.example:6543/x"
    assert ext.dsn("bob", "pw", "d") == "postgresql://bob:pw@db.example:6543/d"
    with pytest.raises(ClusterNotRestartableError, match="TENANTPOOL_TEST_DSN"):
        ext.stop()
    with pytest.raises(ClusterNotRestartableError):
        ext.start_again()
