"""The demo's tenant registry in-process: names, failed provisionings, the sweep, a non-superuser
admin, the resolver's cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from _demo import DemoDatabase
from _postgres import PostgresCluster, quote_ident, unique_name

from demo_api._credentials import scram_verifier
from demo_api._registry import ISOLATIONS, Isolation, Registry, TenantExists, _lock_key
from tenantpool import InvalidTenant, TenantPoolManager

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """The injected failure."""


@pytest.fixture
async def demo_db(pg: PostgresCluster) -> AsyncIterator[DemoDatabase]:
    db = DemoDatabase(pg)
    await pg.create_database(db.control_db)
    try:
        yield db
    finally:
        await db.drop()


async def leftovers(pg: PostgresCluster, db: DemoDatabase, tenant: str, name: str) -> list[str]:
    """Whatever a provisioning of ``tenant`` (objects named ``name``) left behind."""
    found = []
    control = quote_ident(f"{db.prefix}_control")
    if await pg.fetchval(
        f"SELECT 1 FROM {control}.tenants WHERE id = $1", tenant, database=db.control_db
    ):
        found.append("registry row")
    if await pg.fetchval(
        f"SELECT 1 FROM {control}.secrets WHERE role = $1", name, database=db.control_db
    ):
        found.append("secret")
    if await pg.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
        found.append("database")
    if await pg.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
        found.append("role")
    if await pg.fetchval(
        "SELECT 1 FROM pg_namespace WHERE nspname = $1", name, database=db.control_db
    ):
        found.append("schema")
    return found


async def note_round_trip(registry: Registry, tenant: str) -> list[str]:
    """Write a note as ``tenant`` through a real manager and read the tenant's notes back."""
    async with TenantPoolManager(registry.resolve) as manager:
        async with manager.with_connection(tenant) as conn:
            await conn.execute("INSERT INTO notes (body) VALUES ($1)", f"from {tenant}")
            return [row["body"] for row in await conn.fetch("SELECT body FROM notes")]


def test_object_names() -> None:
    registry = Registry("postgresql://x@localhost/db", prefix="demo")
    assert registry.object_name("acme") == "demo_t_acme"
    # The collision rule: case and '-' vs '_' do not make a different name.
    assert registry.object_name("Ac-Me") == registry.object_name("ac_me") == "demo_t_ac_me"
    longest = "a" * 63
    assert len(registry.object_name(longest)) == 63
    assert registry.object_name(longest) != registry.object_name("a" * 62 + "b")
    with pytest.raises(InvalidTenant):
        registry.object_name('x"; DROP TABLE notes; --')


def test_scram_verifier_shape() -> None:
    verifier = scram_verifier("secret")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert "secret" not in verifier
    assert scram_verifier("secret") != verifier  # salted


async def test_a_pre_hashed_password_logs_in(pg: PostgresCluster) -> None:
    role = unique_name("scram")
    await pg.execute(
        f"CREATE ROLE {quote_ident(role)} LOGIN PASSWORD '{scram_verifier('pa55word')}'"
    )
    try:
        conn = await asyncpg.connect(pg.dsn(role, "pa55word"))
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(pg.dsn(role, "wrong"))
    finally:
        await pg.drop_role(role)


STEPS: list[tuple[Isolation, str]] = [
    ("rls", "reserved"),
    ("rls", "objects"),
    ("schema", "reserved"),
    ("schema", "objects"),
    ("role", "reserved"),
    ("role", "objects"),
    ("database", "reserved"),
    ("database", "database"),
    ("database", "tables"),
]


@pytest.mark.parametrize(("isolation", "failing_step"), STEPS)
async def test_a_failed_provisioning_leaves_nothing(
    pg: PostgresCluster, demo_db: DemoDatabase, isolation: Isolation, failing_step: str
) -> None:
    steps: list[str] = []
    failing = {"step": failing_step}

    async def checkpoint(tenant: str, step: str) -> None:
        steps.append(step)
        if step == failing["step"]:
            raise Boom(step)

    registry = Registry(demo_db.url, prefix=demo_db.prefix, checkpoint=checkpoint)
    await registry.open()
    try:
        tenant = f"Half-{isolation}"
        name = registry.object_name(tenant)
        with pytest.raises(Boom):
            await registry.create(tenant, isolation)
        assert steps[-1] == failing_step
        assert await leftovers(pg, demo_db, tenant, name) == []
        assert await registry.resolve(tenant) is None
        # Clean enough to provision the same id again, and to use it.
        failing["step"] = ""
        await registry.create(tenant, isolation)
        assert await note_round_trip(registry, tenant) == [f"from {tenant}"]
    finally:
        await registry.close()


async def test_a_cancelled_database_provisioning_leaves_nothing(
    pg: PostgresCluster, demo_db: DemoDatabase
) -> None:
    entered = anyio.Event()

    async def checkpoint(tenant: str, step: str) -> None:
        if step == "tables":  # the database exists and holds its table
            entered.set()
            await anyio.sleep_forever()

    registry = Registry(demo_db.url, prefix=demo_db.prefix, checkpoint=checkpoint)
    await registry.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(registry.create, "cancelled", "database")
            await entered.wait()
            tg.cancel_scope.cancel()
        name = registry.object_name("cancelled")
        assert await leftovers(pg, demo_db, "cancelled", name) == []
    finally:
        await registry.close()


async def test_existing_ids_and_colliding_names_are_refused(demo_db: DemoDatabase) -> None:
    registry = Registry(demo_db.url, prefix=demo_db.prefix)
    await registry.open()
    try:
        await registry.create("acme", "schema")
        with pytest.raises(TenantExists, match="'acme' already exists"):
            await registry.create("acme", "rls")
        with pytest.raises(TenantExists, match="'ACME' would share database objects with"):
            await registry.create("ACME", "database")
        with anyio.fail_after(30):
            results = []

            async def attempt() -> None:
                try:
                    await registry.create("racer", "role")
                    results.append("created")
                except TenantExists:
                    results.append("exists")

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(attempt)
        assert sorted(results) == ["created", "exists", "exists", "exists"]
    finally:
        await registry.close()


async def test_an_object_of_the_name_that_exists_already_is_left_alone(
    pg: PostgresCluster, demo_db: DemoDatabase
) -> None:
    registry = Registry(demo_db.url, prefix=demo_db.prefix)
    await registry.open()
    try:
        name = registry.object_name("squatted")
        await pg.create_database(name)
        await pg.execute("CREATE TABLE precious (x int)", database=name)
        with pytest.raises(TenantExists, match="a database named"):
            await registry.create("squatted", "database")
        assert await pg.fetchval("SELECT count(*) FROM precious", database=name) == 0
        assert await registry.resolve("squatted") is None
    finally:
        await registry.close()


async def test_a_provisioning_cut_short_by_a_crash_is_swept_at_start(
    pg: PostgresCluster, demo_db: DemoDatabase
) -> None:
    registry = Registry(demo_db.url, prefix=demo_db.prefix)
    await registry.open()
    await registry.close()
    # What a crash between the reservation and the end leaves: a row and some objects.
    control = quote_ident(f"{demo_db.prefix}_control")
    leftover = {iso: f"crashed-{iso}" for iso in ("schema", "database", "role")}
    for isolation, tenant in leftover.items():
        name = registry.object_name(tenant)
        await pg.execute(
            f"INSERT INTO {control}.tenants (id, isolation, object_name) VALUES ($1, $2, $3)",
            tenant,
            isolation,
            name,
            database=demo_db.control_db,
        )
        if isolation == "schema":
            await pg.create_schema(name, database=demo_db.control_db)
        elif isolation == "database":
            await pg.create_database(name)
        else:
            await pg.create_role(name, password="x")
            await pg.execute(
                f"GRANT USAGE ON SCHEMA {quote_ident(demo_db.prefix + '_role')}"
                f" TO {quote_ident(name)}",
                database=demo_db.control_db,
            )
    # A provisioning in progress elsewhere holds its lock: that one is not swept.
    busy = await pg.connect(demo_db.control_db)
    try:
        await pg.execute(
            f"INSERT INTO {control}.tenants (id, isolation, object_name) VALUES ($1, 'rls', $2)",
            "in-progress",
            registry.object_name("in-progress"),
            database=demo_db.control_db,
        )
        await busy.execute("SELECT pg_advisory_lock($1)", _lock_key(demo_db.prefix, "in-progress"))
        again = Registry(demo_db.url, prefix=demo_db.prefix)
        await again.open()
        await again.close()
    finally:
        await busy.close()
    for tenant in leftover.values():
        assert await leftovers(pg, demo_db, tenant, registry.object_name(tenant)) == []
    assert (
        await pg.fetchval(
            f"SELECT state FROM {control}.tenants WHERE id = 'in-progress'",
            database=demo_db.control_db,
        )
        == "provisioning"
    )


async def test_a_non_superuser_admin_with_createdb_createrole_runs_all_four_models(
    pg: PostgresCluster,
) -> None:
    admin = unique_name("demo_admin")
    db = DemoDatabase(pg)
    await pg.create_role(admin, password="admin-pw")
    await pg.execute(f"ALTER ROLE {quote_ident(admin)} CREATEDB CREATEROLE")
    await pg.create_database(db.control_db, owner=admin)
    try:
        registry = Registry(pg.dsn(admin, "admin-pw", db.control_db), prefix=db.prefix)
        await registry.open()
        try:
            for isolation in ISOLATIONS:
                await registry.create(f"np-{isolation}", isolation)
                assert await note_round_trip(registry, f"np-{isolation}") == [
                    f"from np-{isolation}"
                ]
        finally:
            await registry.close()
    finally:
        await db.drop()
        await pg.drop_role(admin)


async def test_the_cache_holds_registered_tenants_only(demo_db: DemoDatabase) -> None:
    registry = Registry(demo_db.url, prefix=demo_db.prefix)
    await registry.open()
    try:
        await registry.create("cached", "rls")
        for n in range(200):
            assert await registry.resolve(f"unknown-{n}") is None
        assert list(registry._cache) == ["cached"]
        # Another process's tenant is found in the table, then cached.
        other = Registry(demo_db.url, prefix=demo_db.prefix)
        await other.open()
        try:
            await other.create("elsewhere", "schema")
        finally:
            await other.close()
        target = await registry.resolve("elsewhere")
        assert target is not None and target.schema == registry.object_name("elsewhere")
        assert list(registry._cache) == ["cached", "elsewhere"]
        for password in await demo_db.secrets():
            assert password not in repr(registry) + repr(target) + repr(registry._cache)
    finally:
        await registry.close()
