"""Tenant isolation against a real PostgreSQL server: nothing a scope does reaches the next one.

Every test drives a real ``TenantPoolManager`` on the session cluster. Where a test needs the
next checkout to land on the same backend, the pool has ``max_size=1`` and the test asserts the
server pid is unchanged, so a "clean" result cannot come from a brand-new connection.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import asyncpg
import pytest
from _postgres import PostgresCluster, quote_ident, quote_literal, unique_name
from _support import drained

from tenantpool import (
    PoolSettings,
    Target,
    TenantPoolError,
    TenantPoolManager,
    TenantUnavailable,
)
from tenantpool._session import GUARD, guard_name

pytestmark = pytest.mark.anyio

# Everything the session can show about leftovers of an earlier scope, in one round trip.
LEFTOVERS_SQL = f"""
SELECT
    current_user::text AS current_user,
    session_user::text AS session_user,
    (SELECT count(*) FROM pg_catalog.pg_class c
      WHERE c.relnamespace = pg_catalog.pg_my_temp_schema()) AS temp_relations,
    (SELECT count(*) FROM pg_catalog.pg_prepared_statements
      WHERE from_sql AND NOT starts_with(name, '{GUARD}')) AS sql_prepared,
    (SELECT count(*) FROM pg_catalog.pg_listening_channels()) AS listening_channels,
    (SELECT count(*) FROM pg_catalog.pg_locks
      WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) AS advisory_locks,
    (SELECT count(*) FROM pg_catalog.pg_cursors) AS cursors,
    pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL AS xid_assigned
"""  # the reset's own prepared guards, like asyncpg's statements, stay
STATE_OF_PID_SQL = "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = $1"
SETTINGS_SQL = "SELECT name, setting, source FROM pg_catalog.pg_settings ORDER BY name"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def admin(pg: PostgresCluster) -> AsyncIterator[asyncpg.Connection]:
    """One superuser connection for a test's setup, checks from outside and cleanup."""
    conn = await pg.connect()
    try:
        yield conn
    finally:
        await conn.close()


def shared_pool_manager(resolver: Any, *, max_size: int = 1) -> TenantPoolManager:
    return TenantPoolManager(resolver, pool=PoolSettings(max_size=max_size, acquire_timeout=10.0))


async def leftovers(conn: Any) -> dict[str, object]:
    row = await conn.fetchrow(LEFTOVERS_SQL)
    return dict(row)


async def settings_of(conn: Any) -> dict[str, str]:
    return {r["name"]: r["setting"] for r in await conn.fetch(SETTINGS_SQL)}


async def assert_settings_clean(conn: Any, clean: Mapping[str, str]) -> None:
    """Every setting has the value of a brand-new session; settings a module loaded since
    (plpgsql's, once a DO block ran) are at their built-in defaults."""
    rows = await conn.fetch(SETTINGS_SQL)
    assert {r["name"]: r["setting"] for r in rows if r["name"] in clean} == clean
    assert {r["name"]: r["source"] for r in rows if r["name"] not in clean} == {
        r["name"]: "default" for r in rows if r["name"] not in clean
    }


async def fresh_baseline(dsn: str) -> tuple[dict[str, object], dict[str, str]]:
    """What a brand-new session of ``dsn`` looks like: the definition of "clean"."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await leftovers(conn), await settings_of(conn)
    finally:
        await conn.close()


async def drop_roles(pg: PostgresCluster, *roles: str) -> None:
    for role in roles:
        await pg.drop_role(role)


def only_pool(manager: TenantPoolManager) -> Any:
    pools = manager.stats().pools
    assert len(pools) == 1, pools
    return next(iter(pools.values()))


# --------------------------------------------------------------------------- 1. dirty every way


@pytest.mark.parametrize("open_tx", ["transaction_object", "raw_begin"])
@pytest.mark.parametrize("next_tenant", ["other_tenant", "same_tenant"])
async def test_nothing_a_dirty_scope_leaves_survives_into_the_next_checkout_of_the_same_backend(
    pg: PostgresCluster, admin: asyncpg.Connection, open_tx: str, next_tenant: str
) -> None:
    dsn = pg.dsn()
    role = unique_name("iso_setrole")
    auth_user = unique_name("iso_sessauth")
    seq = unique_name("iso_seq")
    probe = unique_name("iso_probe")
    channel = unique_name("iso_chan")
    lock_key = secrets.randbits(62)
    await admin.execute(
        f"CREATE ROLE {quote_ident(role)} NOLOGIN;"
        f"CREATE ROLE {quote_ident(auth_user)} NOLOGIN;"
        f"GRANT {quote_ident(role)} TO {quote_ident(pg.superuser)};"
        f"GRANT {quote_ident(role)} TO {quote_ident(auth_user)};"
        f"CREATE SEQUENCE public.{quote_ident(seq)};"
        f"CREATE TABLE public.{quote_ident(probe)} (v text);"
        f"GRANT INSERT, SELECT ON public.{quote_ident(probe)} TO {quote_ident(role)};"
    )
    clean, clean_settings = await fresh_baseline(dsn)
    tenants = {"acme": Target(dsn, settings={"app.tenant_id": "acme"})}
    tenants["globex"] = Target(dsn, settings={"app.tenant_id": "globex"})
    after = "globex" if next_tenant == "other_tenant" else "acme"
    a_notifications: list[str] = []
    a_logs: list[str] = []
    try:
        async with shared_pool_manager(tenants) as manager:
            async with manager.with_connection("acme") as conn:
                pid = conn.get_server_pid()
                await conn.execute(
                    "SET statement_timeout = '17s';"
                    "SET lock_timeout = '3s';"
                    "SET work_mem = '7MB';"
                    "SET search_path = iso_no_such_schema, public;"
                    "SET app.other = 'acme-secret';"
                    "SET app.tenant_id = 'forged-by-acme';"
                    "SET standard_conforming_strings = off;"
                    "SET TIME ZONE 'Pacific/Chatham';"
                )
                await conn.execute("CREATE TEMP TABLE iso_leak_tmp (v int)")
                await conn.execute("PREPARE iso_leak_stmt AS SELECT 1")
                kept_stmt = await conn.prepare("SELECT $1::int + 1")
                assert await kept_stmt.fetchval(1) == 2
                await conn.add_listener(channel, lambda *args: a_notifications.append(args[3]))
                conn.add_log_listener(lambda _c, msg: a_logs.append(str(msg)))
                await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
                async with conn.transaction():
                    await conn.execute(
                        "DECLARE iso_leak_cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)"
                    )
                await conn.execute(f"SELECT nextval('public.{quote_ident(seq)}')")
                await conn.execute(f"SELECT setval('public.{quote_ident(seq)}', 42)")
                assert await conn.fetchval(f"SELECT currval('public.{quote_ident(seq)}')") == 42
                await conn.execute(f"SET SESSION AUTHORIZATION {quote_ident(auth_user)}")
                await conn.execute(f"SET ROLE {quote_ident(role)}")
                kept_tx = None
                if open_tx == "transaction_object":
                    kept_tx = conn.transaction()
                    await kept_tx.start()
                else:
                    await conn.execute("BEGIN")
                await conn.execute(
                    f"INSERT INTO public.{quote_ident(probe)} VALUES ('acme-uncommitted')"
                )
                await conn.execute("SET app.in_tx = 'acme'")

                # Everything above really is in the session now.
                dirty = await leftovers(conn)
                assert dirty["current_user"] == role
                assert dirty["session_user"] == auth_user
                for key in (
                    "temp_relations",
                    "sql_prepared",
                    "listening_channels",
                    "advisory_locks",
                    "cursors",
                ):
                    assert dirty[key] > clean[key], key  # type: ignore[operator]
                assert dirty["xid_assigned"] is True
                assert conn.is_in_transaction()
                dirty_settings = await settings_of(conn)
                for name in ("statement_timeout", "search_path", "standard_conforming_strings"):
                    assert dirty_settings[name] != clean_settings[name], name

            async with manager.with_connection(after) as conn:
                assert conn.get_server_pid() == pid, "the pool did not reuse the backend"
                assert not conn.is_in_transaction()
                assert await leftovers(conn) == clean
                await assert_settings_clean(conn, clean_settings)
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == after
                for name in ("app.other", "app.in_tx"):
                    value = await conn.fetchval("SELECT current_setting($1, true)", name)
                    assert value in (None, ""), (name, value)
                assert await conn.fetchval("SELECT to_regclass('pg_temp.iso_leak_tmp')") is None
                with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
                    await conn.fetchval(f"SELECT currval('public.{quote_ident(seq)}')")
                assert await conn.fetchval(f"SELECT count(*) FROM public.{quote_ident(probe)}") == 0

                # Objects kept from acme's scope cannot act on globex's session.
                with pytest.raises(asyncpg.InterfaceError):
                    await kept_stmt.fetchval(1)
                if kept_tx is not None:
                    async with conn.transaction():
                        await conn.execute(
                            f"INSERT INTO public.{quote_ident(probe)} VALUES ('mine')"
                        )
                        with pytest.raises(asyncpg.InterfaceError):
                            await kept_tx.rollback()
                        with pytest.raises(asyncpg.InterfaceError):
                            await kept_tx.commit()
                        assert conn.is_in_transaction()
                    assert (
                        await conn.fetchval(f"SELECT count(*) FROM public.{quote_ident(probe)}")
                        == 1
                    )

                # A NOTIFY on acme's channel does not reach acme's callback; a control
                # listener proves the notification was sent.
                control = await pg.connect()
                try:
                    got = anyio.Event()
                    await control.add_listener(channel, lambda *_args: got.set())
                    await admin.execute("SELECT pg_notify($1, 'after-scope')", channel)
                    with anyio.fail_after(2):
                        await got.wait()
                finally:
                    await control.close()
                await conn.execute("SELECT pg_sleep(0.05)")
                await conn.execute("SELECT 1")
                assert a_notifications == []

                # Server notices of this scope do not reach acme's log listener.
                own_logs: list[str] = []
                conn.add_log_listener(lambda _c, msg: own_logs.append(str(msg)))
                await conn.execute("DO $$BEGIN RAISE NOTICE 'next scope notice'; END$$")
                await conn.execute("SELECT 1")
                assert any("next scope notice" in m for m in own_logs)
                assert a_logs == []
    finally:
        await admin.execute(
            f"DROP TABLE IF EXISTS public.{quote_ident(probe)};"
            f"DROP SEQUENCE IF EXISTS public.{quote_ident(seq)};"
        )
        await drop_roles(pg, auth_user, role)


async def test_kept_connection_object_refuses_use_while_another_tenant_holds_the_backend(
    pg: PostgresCluster,
) -> None:
    dsn = pg.dsn()
    tenants = {t: Target(dsn, settings={"app.tenant_id": t}) for t in ("acme", "globex")}
    async with shared_pool_manager(tenants) as manager:
        async with manager.with_connection("acme") as kept:
            pid = kept.get_server_pid()
            fetchval = kept.fetchval
            assert await fetchval("SELECT current_setting('app.tenant_id')") == "acme"
        async with manager.with_connection("globex") as conn:
            assert conn.get_server_pid() == pid
            with pytest.raises(TenantPoolError):
                await kept.fetchval("SELECT current_setting('app.tenant_id')")
            with pytest.raises(TenantPoolError):
                await fetchval("SELECT current_setting('app.tenant_id')")
            assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == "globex"


async def test_type_codec_set_in_a_scope_does_not_reach_the_next_tenant(
    pg: PostgresCluster,
) -> None:
    dsn = pg.dsn()
    tenants = {t: Target(dsn, settings={"app.tenant_id": t}) for t in ("acme", "globex")}
    plain = await asyncpg.connect(dsn, timeout=10)
    try:
        expected = await plain.fetchval("""SELECT '{"a": 1}'::json""")
    finally:
        await plain.close()
    async with shared_pool_manager(tenants) as manager:
        async with manager.with_connection("acme") as conn:
            await conn.set_type_codec(
                "json",
                encoder=json.dumps,
                decoder=lambda text: {"decoded_by": "acme", "text": text},
                schema="pg_catalog",
            )
            assert (await conn.fetchval("""SELECT '{"a": 1}'::json"""))["decoded_by"] == "acme"
        async with manager.with_connection("globex") as conn:
            assert await conn.fetchval("""SELECT '{"a": 1}'::json""") == expected


@pytest.mark.parametrize(
    ("tamper", "same_backend"),
    [
        ("PREPARE iso_user_stmt AS SELECT 1", True),
        # These also drop the guard (and, but for the last, asyncpg's own statements): the
        # connection's state is unknown then, so it is closed rather than reused.
        ("DEALLOCATE ALL", False),
        ("DISCARD ALL", False),
        (f"DEALLOCATE {guard_name(0)}", False),
    ],
)
async def test_the_prepared_statement_guard_survives_user_code_tampering_with_it(
    pg: PostgresCluster, tamper: str, same_backend: bool
) -> None:
    """The reset's guard is prepared once per connection; whatever user code does to it, the
    next scope finds no statement of the user's, a guard in working order, and a working
    connection."""
    count_sql = (
        "SELECT count(*) FROM pg_prepared_statements WHERE from_sql AND NOT starts_with(name, $1)"
    )
    async with shared_pool_manager({"acme": Target(pg.dsn())}) as manager:
        async with manager.with_connection("acme") as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET work_mem = '9MB'")  # dirty: reset, guard prepared
        async with manager.with_connection("acme") as conn:
            assert conn.get_server_pid() == pid
            await conn.execute(tamper)
        async with manager.with_connection("acme") as conn:
            assert (conn.get_server_pid() == pid) is same_backend
            assert await conn.fetchval(count_sql, GUARD) == 0
            await conn.execute("SET work_mem = '9MB'")
        async with manager.with_connection("acme") as conn:
            # A target without settings: the guard for none.
            statement = await conn.fetchval(
                "SELECT statement FROM pg_prepared_statements WHERE name = $1", guard_name(0)
            )
            assert f"PREPARE {guard_name(0)} AS SELECT" in statement
            assert "1 / (NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements" in statement
            assert await conn.fetchval("SHOW work_mem") != "9MB"
        await drained(manager)


async def test_the_guard_is_prepared_under_the_default_search_path_not_the_scopes(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    """A ``/`` operator user code puts ahead of pg_catalog on its search_path never reaches the
    reset's guard (prepared after RESET ALL), so a statement the scope PREPAREd still goes."""
    schema = unique_name("iso_evil")
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        # A division that never divides by zero: in the guard it would let the statement live.
        await admin.execute(
            f"CREATE FUNCTION {schema}.never_fails(int, int) RETURNS int LANGUAGE sql AS 'SELECT 1'"
        )
        await admin.execute(
            f"CREATE OPERATOR {schema}./ (LEFTARG = int, RIGHTARG = int,"
            f" FUNCTION = {schema}.never_fails)"
        )
        async with shared_pool_manager({"acme": Target(pg.dsn())}) as manager:
            async with manager.with_connection("acme") as conn:
                await conn.execute(f"SET search_path = {schema}, pg_catalog")
                assert await conn.fetchval("SELECT 1 / 0") == 1  # the operator is in force
                await conn.execute("PREPARE iso_user_stmt AS SELECT 1")
            async with manager.with_connection("acme") as conn:
                assert (await leftovers(conn))["sql_prepared"] == 0
                assert await conn.fetchval("SHOW search_path") != f"{schema}, pg_catalog"
            await drained(manager)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_tenants_with_different_numbers_of_settings_share_a_connection_each_with_its_guard(
    pg: PostgresCluster,
) -> None:
    """The reset's guard is prepared per number of settings: one connection serving tenants of
    0, 1 and 2 settings holds a guard for each, none of them counts as the user's, each tenant
    sees exactly its own settings, and a statement user code prepares is still deallocated
    (which takes the other guards along: they are prepared again when needed)."""
    dsn = pg.dsn()
    targets = {
        "plain": Target(dsn),
        "one": Target(dsn, settings={"app.a": "one"}),
        "two": Target(dsn, settings={"app.a": "two", "app.b": "two"}),
    }
    guards = f"SELECT count(*) FROM pg_prepared_statements WHERE starts_with(name, '{GUARD}')"
    mine = "SELECT current_setting('app.a', true), current_setting('app.b', true)"
    expected = {"plain": [None, None], "one": ["one", None], "two": ["two", "two"]}
    async with shared_pool_manager(targets) as manager:
        pid = None
        for round_ in range(3):
            for tenant in targets:
                async with manager.with_connection(tenant) as conn:
                    pid = pid or conn.get_server_pid()
                    assert conn.get_server_pid() == pid
                    # "" after a RESET of a setting the session once had: as good as unset.
                    seen = [v or None for v in await conn.fetchrow(mine)]
                    assert seen == expected[tenant], (round_, tenant)
                    assert (await leftovers(conn))["sql_prepared"] == 0
                    if round_ == 1 and tenant == "one":
                        await conn.execute("PREPARE iso_user_stmt AS SELECT 1")
                    await conn.execute("SET work_mem = '9MB'")  # dirty: a reset each time
            async with manager.with_connection("plain") as conn:
                # After the deallocating reset (round 1) only the guards used since remain.
                assert await conn.fetchval(guards) == (3 if round_ != 1 else 2)
                await conn.execute("SET work_mem = '9MB'")
        await drained(manager)


# --------------------------------------------------------------------------- 2. released at once


@pytest.mark.parametrize("how", ["transaction_object", "raw_begin", "failed_transaction"])
async def test_session_lock_and_open_transaction_are_released_as_soon_as_the_scope_ends(
    pg: PostgresCluster, admin: asyncpg.Connection, how: str
) -> None:
    dsn = pg.dsn()
    table = f"public.{quote_ident(unique_name('iso_rowlock'))}"
    lock_key = secrets.randbits(62)
    await admin.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 0)"
    )
    outsider = await pg.connect()
    try:
        await outsider.execute("SET lock_timeout = '500ms'")
        async with shared_pool_manager({"acme": Target(dsn)}) as manager:
            async with manager.with_connection("acme") as conn:
                pid = conn.get_server_pid()
                await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
                if how == "transaction_object":
                    await conn.transaction().start()
                else:
                    await conn.execute("BEGIN")
                await conn.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
                # Control: while the scope is open, the lock, the transaction and (unless the
                # transaction failed, which releases its row locks) the row are held.
                assert await outsider.fetchval("SELECT pg_try_advisory_lock($1)", lock_key) is False
                if how == "failed_transaction":
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        await conn.execute("SELECT 1 / (v - v) FROM " + table)
                    with pytest.raises(asyncpg.InFailedSQLTransactionError):
                        await conn.execute("SELECT 1")
                    expected_state = "idle in transaction (aborted)"
                else:
                    with pytest.raises(asyncpg.LockNotAvailableError):
                        await outsider.execute(
                            f"SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE NOWAIT"
                        )
                    expected_state = "idle in transaction"
                assert conn.is_in_transaction()
                assert await outsider.fetchval(STATE_OF_PID_SQL, pid) == expected_state

            await drained(manager, limit=2.0)
            pool = only_pool(manager)
            assert (pool.in_use, pool.idle) == (0, 1)  # kept, not closed, and not checked out
            assert await outsider.fetchval(STATE_OF_PID_SQL, pid) == "idle"
            assert await outsider.fetchval("SELECT pg_try_advisory_lock($1)", lock_key) is True
            await outsider.execute("SELECT pg_advisory_unlock($1)", lock_key)
            assert (
                await outsider.fetchval(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE NOWAIT")
                == 0
            ), "the scope's uncommitted update was not rolled back"
            assert await outsider.execute(f"UPDATE {table} SET v = 2 WHERE id = 1") == "UPDATE 1"
            pool = only_pool(manager)
            assert (pool.in_use, pool.idle) == (0, 1)
            # The same backend serves the next scope, outside any transaction.
            async with manager.with_connection("acme") as conn:
                assert conn.get_server_pid() == pid
                assert not conn.is_in_transaction()
                assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1") == 2
    finally:
        await outsider.close()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")


# --------------------------------------------------------------------------- 3. isolation models


async def test_database_per_tenant_gets_its_own_pool_and_database(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    databases = {t: unique_name(f"iso_db_{t}") for t in ("acme", "globex")}
    for db in databases.values():
        await pg.create_database(db)
    try:
        for tenant, db in databases.items():
            setup = await pg.connect(db)
            try:
                await setup.execute(
                    "CREATE TABLE notes (body text);"
                    f"INSERT INTO notes VALUES ({quote_literal(tenant)})"
                )
            finally:
                await setup.close()
        tenants = {t: Target(pg.dsn(database=db)) for t, db in databases.items()}
        async with shared_pool_manager(tenants) as manager:
            for _ in range(2):
                for tenant, db in databases.items():
                    async with manager.with_connection(tenant) as conn:
                        assert await conn.fetchval("SELECT current_database()") == db
                        assert [r["body"] for r in await conn.fetch("SELECT body FROM notes")] == [
                            tenant
                        ]
            pools = manager.stats().pools
            assert len(pools) == len(databases)
            for db in databases.values():
                assert sum(db in name for name in pools) == 1
            assert not any(pg.superuser_password in name for name in pools)
    finally:
        for db in databases.values():
            await pg.drop_database(db)


async def test_credentials_per_tenant_get_own_pools_and_bad_password_is_not_leaked(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    users = {t: unique_name(f"iso_user_{t}") for t in ("acme", "globex")}
    passwords = {t: f"pw-{t}-{secrets.token_hex(8)}" for t in users}
    for tenant, user in users.items():
        await admin.execute(
            f"CREATE ROLE {quote_ident(user)} LOGIN PASSWORD {quote_literal(passwords[tenant])}"
        )
    wrong_password = f"Wr0ng-{secrets.token_hex(8)}"
    tenants = {t: Target(pg.dsn(user, passwords[t])) for t, user in users.items()}
    tenants["mallory"] = Target(pg.dsn(users["acme"], wrong_password))
    try:
        async with shared_pool_manager(tenants) as manager:
            pids = {}
            for tenant, user in users.items():
                async with manager.with_connection(tenant) as conn:
                    assert await conn.fetchval("SELECT current_user") == user
                    assert await conn.fetchval("SELECT session_user") == user
                    pids[tenant] = conn.get_server_pid()
            assert len(set(pids.values())) == len(users)
            with pytest.raises(TenantUnavailable) as info:
                async with manager.with_connection("mallory"):
                    pass
            for text in (str(info.value), repr(info.value)):
                assert wrong_password not in text
            pools = manager.stats().pools
            assert sum(1 for s in pools.values() if s.in_use == 0) == len(pools)
            for user in users.values():
                assert sum(user in name for name in pools) >= 1
            # acme's and mallory's DSNs differ only by password: separate pools all the same.
            assert len(pools) == len(tenants)
            for secret in (*passwords.values(), wrong_password):
                assert not any(secret in name for name in pools)
    finally:
        await drop_roles(pg, *users.values())


async def test_schema_per_tenant_resolves_unqualified_names_to_the_tenants_own_table(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    dsn = pg.dsn()
    schemas = {t: unique_name(f"iso_schema_{t}") for t in ("acme", "globex", "initech")}
    for tenant, schema in schemas.items():
        await admin.execute(
            f"CREATE SCHEMA {quote_ident(schema)};"
            f"CREATE TABLE {quote_ident(schema)}.items (owner text);"
            f"INSERT INTO {quote_ident(schema)}.items VALUES ({quote_literal(tenant)});"
        )
    tenants = {t: Target(dsn, schema=s) for t, s in schemas.items()}
    try:
        async with shared_pool_manager(tenants) as manager:
            for tenant in ["acme", "globex", "acme", "initech", "initech", "globex"]:
                async with manager.with_connection(tenant) as conn:
                    assert await conn.fetchval("SELECT current_schemas(false)") == [schemas[tenant]]
                    assert await conn.fetchval("SELECT current_schema()") == schemas[tenant]
                    assert [r["owner"] for r in await conn.fetch("SELECT owner FROM items")] == [
                        tenant
                    ]
            assert len(manager.stats().pools) == 1
    finally:
        for schema in schemas.values():
            await pg.drop_schema(schema)


async def test_rls_shared_database_shows_each_tenant_only_its_own_rows(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    owner = unique_name("iso_rls_owner")
    password = secrets.token_hex(12)
    schema = unique_name("iso_rls")
    table = f"{quote_ident(schema)}.notes"
    tenant_ids = ["acme", "globex", "initech"]
    await admin.execute(
        f"CREATE ROLE {quote_ident(owner)} LOGIN NOSUPERUSER NOBYPASSRLS"
        f" PASSWORD {quote_literal(password)};"
        f"CREATE SCHEMA {quote_ident(schema)} AUTHORIZATION {quote_ident(owner)};"
        f"CREATE TABLE {table} (tenant_id text NOT NULL, body text NOT NULL);"
        f"INSERT INTO {table} SELECT t, t || '-note-' || n"
        f" FROM unnest(ARRAY['acme', 'globex', 'initech']) t, generate_series(1, 3) n;"
        f"ALTER TABLE {table} OWNER TO {quote_ident(owner)};"
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;"
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY;"
        f"CREATE POLICY tenant_rows ON {table}"
        f" USING (tenant_id = current_setting('app.tenant_id'))"
        f" WITH CHECK (tenant_id = current_setting('app.tenant_id'));"
    )
    dsn = pg.dsn(owner, password)
    tenants = {t: Target(dsn, settings={"app.tenant_id": t}) for t in tenant_ids}
    all_rows = await admin.fetch(f"SELECT tenant_id, body FROM {table}")
    try:
        async with shared_pool_manager(tenants) as manager:
            for tenant in ["acme", "globex", "acme", "initech", "globex", "initech"]:
                async with manager.with_connection(tenant) as conn:
                    assert await conn.fetchval("SELECT current_user") == owner
                    seen = sorted(tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}"))
                    expected = sorted(tuple(r) for r in all_rows if r["tenant_id"] == tenant)
                    assert seen == expected
                    assert len(seen) == 3
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(f"INSERT INTO {table} VALUES ('someone-else', 'x')")
            assert len(manager.stats().pools) == 1
    finally:
        await drop_roles(pg, owner)


async def test_set_role_model_runs_as_the_tenant_role_with_the_login_user_as_session_user(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    login = unique_name("iso_login")
    password = secrets.token_hex(12)
    roles = {t: unique_name(f"iso_role_{t}") for t in ("acme", "globex")}
    await admin.execute(
        f"CREATE ROLE {quote_ident(login)} LOGIN PASSWORD {quote_literal(password)}"
    )
    for role in roles.values():
        await admin.execute(
            f"CREATE ROLE {quote_ident(role)} NOLOGIN;"
            f"GRANT {quote_ident(role)} TO {quote_ident(login)}"
        )
    dsn = pg.dsn(login, password)
    tenants = {t: Target(dsn, role=r) for t, r in roles.items()}
    tenants["plain"] = Target(dsn)
    try:
        async with shared_pool_manager(tenants) as manager:
            for tenant in ["acme", "globex", "plain", "acme", "acme", "plain", "globex"]:
                async with manager.with_connection(tenant) as conn:
                    expected = roles.get(tenant, login)
                    assert await conn.fetchval("SELECT current_user") == expected
                    assert await conn.fetchval("SELECT session_user") == login
            assert len(manager.stats().pools) == 1
    finally:
        await drop_roles(pg, *roles.values(), login)


# --------------------------------------------------------------------------- 4. injection

# Each identifier holds the test's unique canary name, so that the roles and schemas made from
# them are unique too.
HOSTILE_IDENTIFIERS = [
    '"; DROP TABLE {canary}; --',
    "'); DROP TABLE {canary}; --",
    "\\'; DROP TABLE {canary}; --",
    "back\\slash \"dq\" 'sq' {canary} \\",
    "$tenantpool$; DROP TABLE {canary}; $$",
    "ünïcödé ☃ 日本 🐘 {canary}",
    "Mixed Case, comma {canary}",
]
HOSTILE_VALUES = [
    *HOSTILE_IDENTIFIERS,
    "\\",
    "\\\\'",
    "E'\\x41' || 'x",
    "line1\nline2\ttab",
    "",
    "$$ ; SELECT 1; $$",
]


def hostile(template: str, canary: str) -> str:
    return template.replace("{canary}", canary)


async def assert_canary_alive(admin: asyncpg.Connection, canary: str) -> None:
    assert await admin.fetchval(f"SELECT count(*) FROM public.{quote_ident(canary)}") == 1


async def test_hostile_schema_role_and_setting_values_never_execute_sql(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    dsn = pg.dsn()
    canary = unique_name("c")
    await admin.execute(
        f"CREATE TABLE public.{quote_ident(canary)} (v int);"
        f"INSERT INTO public.{quote_ident(canary)} VALUES (1)"
    )
    idents = [hostile(t, canary) for t in HOSTILE_IDENTIFIERS]
    values = [hostile(t, canary) for t in HOSTILE_VALUES]
    for ident in idents:
        assert len(ident.encode()) <= 63, ident
        await admin.execute(
            f"CREATE SCHEMA {quote_ident(ident)};"
            f"CREATE TABLE {quote_ident(ident)}.marker (v text);"
            f"INSERT INTO {quote_ident(ident)}.marker VALUES ({quote_literal(ident)});"
            f"CREATE ROLE {quote_ident(ident)} NOLOGIN;"
            f"GRANT USAGE ON SCHEMA {quote_ident(ident)} TO {quote_ident(ident)};"
            f"GRANT SELECT ON {quote_ident(ident)}.marker TO {quote_ident(ident)};"
        )
    tenants: dict[str, Target] = {}
    expected: dict[str, tuple[str, str]] = {}
    for i, value in enumerate(values):
        ident = idents[i % len(idents)]
        tenants[f"t{i}"] = Target(dsn, schema=ident, role=ident, settings={"app.value": value})
        expected[f"t{i}"] = (ident, value)
    missing_role = hostile('"; DROP TABLE {canary}; -- no such role', canary)
    tenants["norole"] = Target(dsn, role=missing_role, settings={"app.value": values[1]})
    try:
        async with shared_pool_manager(tenants) as manager:
            pid = None
            for i, (tenant, (ident, value)) in enumerate(expected.items()):
                # Twice in a row: the first checkout applies the state with bind parameters,
                # the second reads what the background reset re-applied as SQL literals.
                for round_ in range(2):
                    async with manager.with_connection(tenant) as conn:
                        pid = pid or conn.get_server_pid()
                        assert conn.get_server_pid() == pid
                        row = await conn.fetchrow(
                            "SELECT current_setting('app.value') AS value,"
                            " current_user::text AS role, current_schemas(false) AS schemas"
                        )
                        assert (row["value"], row["role"], row["schemas"]) == (
                            value,
                            ident,
                            [ident],
                        )
                        assert await conn.fetchval("SELECT v FROM marker") == ident
                        if round_ == 0:
                            # A hostile SQL-level prepared statement name, deallocated by the
                            # reset; and, on odd tenants, a reset parsed with backslash escapes.
                            await conn.execute(f"PREPARE {quote_ident(ident)} AS SELECT 1")
                            if i % 2:
                                await conn.execute("SET standard_conforming_strings = off")
                        else:
                            assert (
                                await conn.fetchval(
                                    "SELECT count(*) FROM pg_prepared_statements"
                                    f" WHERE from_sql AND NOT starts_with(name, '{GUARD}')"
                                )
                                == 0
                            )
                await assert_canary_alive(admin, canary)
            with pytest.raises(TenantPoolError):
                async with manager.with_connection("norole"):
                    pass
            await drained(manager, limit=2.0)
            async with manager.with_connection("t0") as conn:
                assert await conn.fetchval("SELECT current_user") == expected["t0"][0]
        await assert_canary_alive(admin, canary)
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS public.{quote_ident(canary)}")
        for ident in idents:
            await pg.drop_schema(ident)
        await drop_roles(pg, *idents)


async def test_hostile_values_round_trip_exactly_with_standard_conforming_strings_off(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    login = unique_name("iso_noscs")
    password = secrets.token_hex(12)
    canary = unique_name("c")
    await admin.execute(
        f"CREATE TABLE public.{quote_ident(canary)} (v int);"
        f"INSERT INTO public.{quote_ident(canary)} VALUES (1);"
        f"CREATE ROLE {quote_ident(login)} LOGIN PASSWORD {quote_literal(password)};"
        f"ALTER ROLE {quote_ident(login)} SET standard_conforming_strings = off;"
        f"ALTER ROLE {quote_ident(login)} SET escape_string_warning = off;"
    )
    dsn = pg.dsn(login, password)
    values = [hostile(t, canary) for t in HOSTILE_VALUES]
    tenants = {f"t{i}": Target(dsn, settings={"app.value": v}) for i, v in enumerate(values)}
    try:
        async with shared_pool_manager(tenants) as manager:
            pid = None
            for i, value in enumerate(values):
                for _ in range(2):  # bind parameters, then the reset's literals
                    async with manager.with_connection(f"t{i}") as conn:
                        pid = pid or conn.get_server_pid()
                        assert conn.get_server_pid() == pid
                        assert await conn.fetchval("SHOW standard_conforming_strings") == "off"
                        assert await conn.fetchval("SELECT current_setting('app.value')") == value
            await assert_canary_alive(admin, canary)
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS public.{quote_ident(canary)}")
        await drop_roles(pg, login)


@pytest.mark.parametrize(
    "name",
    [
        "app.tenant id",
        "app.tenant_id; DROP TABLE x",
        "app.x'--",
        'app."x"',
        "",
        "1app.x",
        "app.",
        ".app",
        "app..x",
        "app.tenant_id\n",
        "app.x\x00",
        "app-x",
    ],
)
def test_target_rejects_a_setting_name_that_is_not_a_guc_name(name: str) -> None:
    with pytest.raises(ValueError):
        Target("postgresql://u@localhost/db", settings={name: "v"})


@pytest.mark.parametrize("field", ["schema", "role", "value"])
def test_target_rejects_nul_characters(field: str) -> None:
    kwargs: dict[str, Any] = {
        "schema": {"schema": "a\x00b"},
        "role": {"role": "a\x00b"},
        "value": {"settings": {"app.tenant_id": "a\x00b"}},
    }[field]
    with pytest.raises(ValueError):
        Target("postgresql://u@localhost/db", **kwargs)


# --------------------------------------------------------------------------- 5. concurrency


async def test_300_concurrent_scopes_of_12_tenants_on_4_connections_each_start_clean(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    dsn = pg.dsn()
    tenant_ids = [f"tenant-{i:02d}" for i in range(12)]
    tenants = {t: Target(dsn, settings={"app.tenant_id": t}) for t in tenant_ids}
    lock_space = secrets.randbits(31)  # advisory locks (lock_space, tenant index): ours only
    tenants_by_pid: dict[int, set[str]] = {}
    done: list[str] = []

    async def one_scope(manager: TenantPoolManager, n: int) -> None:
        index = n % len(tenant_ids)
        tenant = tenant_ids[index]
        async with manager.with_connection(tenant) as conn:
            row = await conn.fetchrow(
                "SELECT current_setting('app.tenant_id') AS tenant,"
                " current_setting('app.junk', true) AS junk,"
                " to_regclass('pg_temp.junk') IS NOT NULL AS temp_table,"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "   AND pid = pg_backend_pid()) AS advisory_locks,"
                " pg_backend_pid() AS pid"
            )
            assert row["tenant"] == tenant
            assert row["junk"] in (None, ""), row["junk"]
            assert row["temp_table"] is False
            assert row["advisory_locks"] == 0
            tenants_by_pid.setdefault(row["pid"], set()).add(tenant)
            await conn.execute(
                f"SET app.junk = {quote_literal(tenant)}; CREATE TEMP TABLE junk (v int)"
            )
            await conn.execute("SELECT pg_advisory_lock($1, $2)", lock_space, index)
            done.append(tenant)

    async with TenantPoolManager(
        tenants, pool=PoolSettings(max_size=4, acquire_timeout=20.0)
    ) as manager:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(300):
                    tg.start_soon(one_scope, manager, n)
        assert len(done) == 300
        assert manager.stats().in_use == 0
        assert 1 <= len(tenants_by_pid) <= 4
        # Connections really passed from tenant to tenant, so the clean starts mean something.
        assert max(len(served) for served in tenants_by_pid.values()) > 1
        await drained(manager, limit=2.0)
        assert (
            await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1",
                lock_space,
            )
            == 0
        )


# --------------------------------------------------------------------------- 6. fewer settings


async def test_next_tenant_with_fewer_settings_gets_the_extra_setting_schema_and_role_reset(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    dsn = pg.dsn()
    schema = unique_name("iso_rich_schema")
    role = unique_name("iso_rich_role")
    await admin.execute(
        f"CREATE SCHEMA {quote_ident(schema)}; CREATE ROLE {quote_ident(role)} NOLOGIN;"
    )
    tenants = {
        "rich": Target(
            dsn,
            schema=schema,
            role=role,
            settings={"app.tenant_id": "rich", "app.extra": "rich-only"},
        ),
        "lean": Target(dsn, settings={"app.tenant_id": "lean"}),
    }
    _, clean_settings = await fresh_baseline(dsn)

    async def state(conn: Any) -> Mapping[str, object]:
        row = await conn.fetchrow(
            "SELECT current_setting('app.tenant_id', true) AS tenant_id,"
            " current_setting('app.extra', true) AS extra,"
            " current_setting('search_path') AS search_path,"
            " current_user::text AS current_user, session_user::text AS session_user"
        )
        return dict(row)

    try:
        async with shared_pool_manager(tenants) as manager:
            pid = None
            # "rich" used its connection (reset path) or did not (straight to the next apply).
            for rich_uses_connection in (True, False, True):
                async with manager.with_connection("rich") as conn:
                    pid = pid or conn.get_server_pid()
                    if rich_uses_connection:
                        assert await state(conn) == {
                            "tenant_id": "rich",
                            "extra": "rich-only",
                            "search_path": quote_ident(schema),
                            "current_user": role,
                            "session_user": pg.superuser,
                        }
                async with manager.with_connection("lean") as conn:
                    assert conn.get_server_pid() == pid
                    lean = await state(conn)
                    assert lean["extra"] in (None, "")
                    assert lean == {
                        "tenant_id": "lean",
                        "extra": lean["extra"],
                        "search_path": clean_settings["search_path"],
                        "current_user": pg.superuser,
                        "session_user": pg.superuser,
                    }
                    await assert_settings_clean(conn, clean_settings)
    finally:
        await pg.drop_schema(schema)
        await drop_roles(pg, role)


async def test_switching_between_role_tenants_applies_settings_as_the_login_user(
    pg: PostgresCluster, admin: asyncpg.Connection
) -> None:
    """Settings are applied before the tenant's role; the previous tenant's role must not be
    in effect either, or a setting the login user may change but the role may not fails."""
    dsn = pg.dsn()  # superuser login: it may set superuser-only parameters
    roles = {t: unique_name(f"iso_r_{t}") for t in ("acme", "globex")}
    for role in roles.values():
        await admin.execute(f"CREATE ROLE {quote_ident(role)} NOLOGIN NOSUPERUSER")
    tenants = {
        "acme": Target(dsn, role=roles["acme"]),
        # log_duration: a superuser-only parameter, set to a non-default value.
        "globex": Target(dsn, role=roles["globex"], settings={"log_duration": "on"}),
    }
    _, clean_settings = await fresh_baseline(dsn)
    assert clean_settings["log_duration"] != "on"
    try:
        async with shared_pool_manager(tenants) as manager:
            # From a fresh connection it works: settings first, then the role.
            async with manager.with_connection("globex") as conn:
                pid = conn.get_server_pid()
                assert await conn.fetchval("SELECT current_user") == roles["globex"]
                assert await conn.fetchval("SHOW log_duration") == "on"
            for _ in range(2):
                async with manager.with_connection("acme") as conn:
                    assert conn.get_server_pid() == pid
                    assert await conn.fetchval("SELECT current_user") == roles["acme"]
                    assert (
                        await conn.fetchval("SHOW log_duration") == clean_settings["log_duration"]
                    )
                # The same checkout after acme must work the same way.
                async with manager.with_connection("globex") as conn:
                    assert conn.get_server_pid() == pid
                    assert await conn.fetchval("SELECT current_user") == roles["globex"]
                    assert await conn.fetchval("SHOW log_duration") == "on"
    finally:
        await drop_roles(pg, *roles.values())
