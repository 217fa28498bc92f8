"""The tenant registry: the control tables, provisioning of the four isolation models, the resolver.

Everything the demo creates is named after ``DEMO_PREFIX`` (``demo`` below):

============================ ===================================================================
``demo_control`` (schema)    ``tenants`` (the registry) and ``secrets``; no one but the admin
                             role (``DATABASE_URL``'s user) may use it
``demo_app`` (login role)    what rls, schema and database tenants connect as: no superuser, no
                             BYPASSRLS, so row-level security applies to it
``demo_rls.notes``           the rls tenants' notes, one table; ``FORCE ROW LEVEL SECURITY``,
                             policy ``tenant_id = current_setting('app.tenant_id')``
``demo_role.notes``          the role tenants' notes, one table; policy ``owner = current_user``
``demo_t_<id>``              a schema tenant's schema, a database tenant's database, a role
                             tenant's login role
============================ ===================================================================

Tenant object names: ``demo_t_`` + the id lower-cased with ``-`` turned into ``_``; a name
longer than PostgreSQL's 63 bytes keeps its first 54 and a hash of the whole. Ids that differ
only by case or by ``-``/``_`` (``Acme``, ``acme``, ``ac-me``/``ac_me``) would share objects,
so the registry refuses the second one (409), whatever its isolation model. The demo owns every
object named ``demo_t_*`` on its server.

Provisioning reserves the id with a committed ``provisioning`` row (a second POST of the id
gets a unique violation, 409, at once), creates the objects -- in one transaction for rls,
schema and role; ``CREATE DATABASE`` cannot run in one, so a database that was created is
dropped again on failure -- and marks the row ``ready``. A failure anywhere deletes the row and
what was created. A provisioning cut short by a crash is swept at the next start.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias, get_args

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tenantpool import PoolSettings, Target, validate_tenant_id

from ._credentials import new_password, scram_verifier, with_database, with_user

__all__ = ["ISOLATIONS", "Isolation", "Registry", "Tenant", "TenantExists"]

logger = logging.getLogger("demo_api")

Isolation = Literal["rls", "schema", "database", "role"]
ISOLATIONS: tuple[Isolation, ...] = get_args(Isolation)

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy

# A checkpoint hook: called with (tenant id, step name) after each provisioning step; an
# exception raised there aborts the provisioning. For tests that inject failures.
Checkpoint = Callable[[str, str], Awaitable[None]]

_MAX_NAME = 63
_CACHE_SIZE = 4096
# The shared app role's pool serves every rls and schema tenant; a tenant of its own
# (database, role) gets a small pool.
SHARED_POOL = PoolSettings(max_size=10, idle_timeout=60.0)
TENANT_POOL = PoolSettings(max_size=3, idle_timeout=60.0)


class TenantExists(Exception):
    """Raised when a tenant id, or one naming the same database objects, is registered."""


def _taken(kind: str, name: str) -> TenantExists:
    return TenantExists(f"a {kind} named {name!r} already exists on the server")


def quote_ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings=on)."""
    return "'" + value.replace("'", "''") + "'"


def _lock_key(*parts: str) -> int:
    """A 64-bit advisory lock key for ``parts``."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class Tenant:
    """A registered tenant and the ``Target`` it connects to (the repr hides passwords)."""

    id: str
    isolation: Isolation
    object_name: str
    created_at: datetime
    target: Target


class Registry:
    """The control tables in ``DATABASE_URL``'s database, and every tenant's objects.

    ``await registry.open()`` creates what is missing (idempotent, safe from several processes
    at once) and sweeps provisionings a crash cut short; ``resolve`` is the manager's resolver.
    """

    def __init__(
        self, admin_dsn: str, *, prefix: str = "demo", checkpoint: Checkpoint | None = None
    ) -> None:
        self._admin_dsn = admin_dsn
        self.prefix = prefix
        self.control_schema = f"{prefix}_control"
        self.rls_schema = f"{prefix}_rls"
        self.role_schema = f"{prefix}_role"
        self.app_role = f"{prefix}_app"
        self._checkpoint = checkpoint
        self._app_dsn = ""
        self._pool: asyncpg.Pool | None = None
        # Known tenants, most recently used last. Only registered tenants get in, and at most
        # _CACHE_SIZE of them: unknown ids cost a lookup each, never memory.
        self._cache: collections.OrderedDict[str, Tenant] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"<Registry prefix={self.prefix!r}, {len(self._cache)} tenants cached>"

    # -- names -------------------------------------------------------------------------------

    def object_name(self, tenant_id: str) -> str:
        """The schema, database or role name of ``tenant_id``'s objects."""
        slug = validate_tenant_id(tenant_id).lower().replace("-", "_")
        name = f"{self.prefix}_t_{slug}"
        if len(name) > _MAX_NAME:
            digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
            name = f"{name[: _MAX_NAME - 9]}_{digest}"
        return name

    @property
    def _tenants(self) -> str:
        return f"{quote_ident(self.control_schema)}.tenants"

    @property
    def _secrets(self) -> str:
        return f"{quote_ident(self.control_schema)}.secrets"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the control tables, the app role and the shared tables if missing."""
        self._pool = await asyncpg.create_pool(
            self._admin_dsn, min_size=0, max_size=4, max_inactive_connection_lifetime=60.0
        )
        try:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self.prefix))
                    await self._create_control_tables(conn)
                    app_password = await self._ensure_app_role(conn)
                    await self._create_shared_tables(conn)
            self._app_dsn = with_user(self._admin_dsn, self.app_role, app_password)
            await self._sweep()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _control(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the registry is not open")
        return self._pool

    async def _create_control_tables(self, conn: Conn) -> None:
        schema = quote_ident(self.control_schema)
        await conn.execute(f"""
            CREATE SCHEMA IF NOT EXISTS {schema};
            REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
            CREATE TABLE IF NOT EXISTS {self._tenants} (
                id text PRIMARY KEY,
                isolation text NOT NULL
                    CHECK (isolation IN ('rls', 'schema', 'database', 'role')),
                object_name text NOT NULL UNIQUE,
                state text NOT NULL DEFAULT 'provisioning'
                    CHECK (state IN ('provisioning', 'ready')),
                created_at timestamptz NOT NULL DEFAULT now()
            );
            -- The app role's and each role tenant's generated password, in clear text. This
            -- is a demo: a real service would keep them in a secret store, not next to the
            -- data. Only the admin role can read this schema; no HTTP response, log line or
            -- repr shows these.
            CREATE TABLE IF NOT EXISTS {self._secrets} (
                role text PRIMARY KEY,
                password text NOT NULL
            );
            """)

    async def _ensure_app_role(self, conn: Conn) -> str:
        """Create the app role (or give it a new password if we have none); its password."""
        app = self.app_role
        role = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", app
        )
        stored: str | None = await conn.fetchval(
            f"SELECT password FROM {self._secrets} WHERE role = $1", app
        )
        if role is not None and (role["rolsuper"] or role["rolbypassrls"]):
            raise RuntimeError(
                f"role {app!r} is a superuser or has BYPASSRLS: row-level security would not"
                " apply to it; alter it, or choose another DEMO_PREFIX"
            )
        if role is not None and stored is not None:
            return stored
        password = new_password()
        verifier = quote_literal(scram_verifier(password))
        if role is None:
            await conn.execute(
                f"CREATE ROLE {quote_ident(app)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
                f" NOBYPASSRLS PASSWORD {verifier}"
            )
        else:
            await conn.execute(f"ALTER ROLE {quote_ident(app)} PASSWORD {verifier}")
        await conn.execute(
            f"INSERT INTO {self._secrets} (role, password) VALUES ($1, $2)"
            " ON CONFLICT (role) DO UPDATE SET password = excluded.password",
            app,
            password,
        )
        return password

    async def _create_shared_tables(self, conn: Conn) -> None:
        app = quote_ident(self.app_role)
        rls = quote_ident(self.rls_schema)
        role = quote_ident(self.role_schema)
        await conn.execute(f"""
            CREATE SCHEMA IF NOT EXISTS {rls};
            CREATE TABLE IF NOT EXISTS {rls}.notes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant_id text NOT NULL DEFAULT current_setting('app.tenant_id'),
                body text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE INDEX IF NOT EXISTS notes_tenant_id_id_idx ON {rls}.notes (tenant_id, id);
            ALTER TABLE {rls}.notes ENABLE ROW LEVEL SECURITY;
            ALTER TABLE {rls}.notes FORCE ROW LEVEL SECURITY;
            DROP POLICY IF EXISTS tenant_isolation ON {rls}.notes;
            CREATE POLICY tenant_isolation ON {rls}.notes
                USING (tenant_id = current_setting('app.tenant_id'))
                WITH CHECK (tenant_id = current_setting('app.tenant_id'));
            GRANT USAGE ON SCHEMA {rls} TO {app};
            GRANT SELECT, INSERT ON {rls}.notes TO {app};

            CREATE SCHEMA IF NOT EXISTS {role};
            CREATE TABLE IF NOT EXISTS {role}.notes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                owner name NOT NULL DEFAULT current_user,
                body text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE INDEX IF NOT EXISTS notes_owner_id_idx ON {role}.notes (owner, id);
            ALTER TABLE {role}.notes ENABLE ROW LEVEL SECURITY;
            ALTER TABLE {role}.notes FORCE ROW LEVEL SECURITY;
            DROP POLICY IF EXISTS tenant_isolation ON {role}.notes;
            CREATE POLICY tenant_isolation ON {role}.notes
                USING (owner = current_user) WITH CHECK (owner = current_user);
            """)

    # -- the resolver ------------------------------------------------------------------------

    async def resolve(self, tenant_id: str) -> Target | None:
        """The manager's resolver: ``tenant_id``'s ``Target``, or None if it is not registered."""
        tenant = await self.get(tenant_id)
        return None if tenant is None else tenant.target

    async def get(self, tenant_id: str) -> Tenant | None:
        """A registered (fully provisioned) tenant, from the cache or the control table."""
        tenant = self._cache.get(tenant_id)
        if tenant is not None:
            self._cache.move_to_end(tenant_id)
            return tenant
        row = await self._control().fetchrow(
            f"SELECT t.id, t.isolation, t.object_name, t.created_at, s.password"
            f" FROM {self._tenants} t LEFT JOIN {self._secrets} s"
            f"   ON t.isolation = 'role' AND s.role = t.object_name"
            f" WHERE t.id = $1 AND t.state = 'ready'",
            tenant_id,
        )
        if row is None:
            return None
        tenant = self._tenant(row)
        self._remember(tenant)
        return tenant

    async def list_tenants(self, limit: int = 1000) -> list[Tenant]:
        """The registered (fully provisioned) tenants, oldest first, at most ``limit``."""
        rows = await self._control().fetch(
            f"SELECT t.id, t.isolation, t.object_name, t.created_at, s.password"
            f" FROM {self._tenants} t LEFT JOIN {self._secrets} s"
            f"   ON t.isolation = 'role' AND s.role = t.object_name"
            f" WHERE t.state = 'ready' ORDER BY t.created_at, t.id LIMIT $1",
            limit,
        )
        return [self._tenant(row) for row in rows]

    def _tenant(self, row: asyncpg.Record | dict[str, Any]) -> Tenant:
        isolation: Isolation = row["isolation"]
        name: str = row["object_name"]
        tenant_id: str = row["id"]
        if isolation == "rls":
            target = Target(
                self._app_dsn,
                schema=self.rls_schema,
                settings={"app.tenant_id": tenant_id},
                pool=SHARED_POOL,
            )
        elif isolation == "schema":
            target = Target(self._app_dsn, schema=name, pool=SHARED_POOL)
        elif isolation == "database":
            target = Target(with_database(self._app_dsn, name), pool=TENANT_POOL)
        else:
            dsn = with_user(self._admin_dsn, name, row["password"])
            target = Target(dsn, schema=self.role_schema, pool=TENANT_POOL)
        return Tenant(tenant_id, isolation, name, row["created_at"], target)

    def _remember(self, tenant: Tenant) -> None:
        self._cache[tenant.id] = tenant
        self._cache.move_to_end(tenant.id)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    # -- provisioning ------------------------------------------------------------------------

    async def create(self, tenant_id: str, isolation: Isolation) -> Tenant:
        """Register ``tenant_id`` and create its objects; ``TenantExists`` if taken.

        All or nothing: a failure (or a cancellation) removes the reservation and every
        object made so far before the error goes on.
        """
        validate_tenant_id(tenant_id)
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}")
        name = self.object_name(tenant_id)
        password = new_password() if isolation == "role" else None
        async with self._control().acquire() as conn:
            # Held while provisioning, so that another process's sweep leaves this one alone.
            await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(self.prefix, tenant_id))
            try:
                created_at = await self._reserve(conn, tenant_id, isolation, name)
                # One provisioning at a time: concurrent GRANTs on one schema fail with "tuple
                # concurrently updated". After the reservation, so a duplicate is told at once.
                await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(self.prefix))
                await self._provision(conn, tenant_id, isolation, name, password)
            finally:
                await conn.execute("SELECT pg_advisory_unlock_all()")
        row = {
            "id": tenant_id,
            "isolation": isolation,
            "object_name": name,
            "created_at": created_at,
            "password": password,
        }
        tenant = self._tenant(row)
        self._remember(tenant)
        logger.info("tenant %r created (%s isolation)", tenant_id, isolation)
        return tenant

    async def _provision(
        self, conn: Conn, tenant_id: str, isolation: Isolation, name: str, password: str | None
    ) -> None:
        made_database = False
        try:
            await self._step(tenant_id, "reserved")
            if isolation == "database":
                # Set first: a cancellation may land after the server made it.
                made_database = True
                try:
                    await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
                except asyncpg.DuplicateDatabaseError:
                    made_database = False  # not ours to drop
                    raise _taken("database", name) from None
                await self._fill_database(conn, tenant_id, name)
            else:
                async with conn.transaction():
                    if isolation == "schema":
                        await self._create_schema(conn, name)
                    elif isolation == "role":
                        await self._create_role(conn, name, password or "")
                    await self._step(tenant_id, "objects")
                    await self._mark_ready(conn, tenant_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._undo(tenant_id, name, drop_database=made_database)
            raise

    async def _step(self, tenant_id: str, step: str) -> None:
        if self._checkpoint is not None:
            await self._checkpoint(tenant_id, step)

    async def _reserve(self, conn: Conn, tenant_id: str, isolation: str, name: str) -> datetime:
        try:
            created_at: datetime = await conn.fetchval(
                f"INSERT INTO {self._tenants} (id, isolation, object_name) VALUES ($1, $2, $3)"
                " RETURNING created_at",
                tenant_id,
                isolation,
                name,
            )
        except asyncpg.UniqueViolationError:
            other = await conn.fetchval(
                f"SELECT id FROM {self._tenants} WHERE object_name = $1", name
            )
            if other is None or other == tenant_id:
                raise TenantExists(f"tenant {tenant_id!r} already exists") from None
            raise TenantExists(
                f"tenant {tenant_id!r} would share database objects with tenant {other!r}:"
                " ids that differ only by case or by '-' and '_' cannot both be registered"
            ) from None
        return created_at

    async def _mark_ready(self, conn: Conn, tenant_id: str) -> None:
        await conn.execute(f"UPDATE {self._tenants} SET state = 'ready' WHERE id = $1", tenant_id)

    async def _create_schema(self, conn: Conn, name: str) -> None:
        schema, app = quote_ident(name), quote_ident(self.app_role)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
        except asyncpg.DuplicateSchemaError:
            raise _taken("schema", name) from None
        await conn.execute(f"""
            CREATE TABLE {schema}.notes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                body text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            );
            GRANT USAGE ON SCHEMA {schema} TO {app};
            GRANT SELECT, INSERT ON {schema}.notes TO {app};
            """)

    async def _create_role(self, conn: Conn, name: str, password: str) -> None:
        role, schema = quote_ident(name), quote_ident(self.role_schema)
        verifier = quote_literal(scram_verifier(password))
        try:
            await conn.execute(
                f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS"
                f" NOINHERIT CONNECTION LIMIT 20 PASSWORD {verifier}"
            )
        except asyncpg.DuplicateObjectError:
            raise _taken("role", name) from None
        await conn.execute(f"""
            GRANT USAGE ON SCHEMA {schema} TO {role};
            GRANT SELECT, INSERT ON {schema}.notes TO {role};
            """)
        await conn.execute(
            f"INSERT INTO {self._secrets} (role, password) VALUES ($1, $2)", name, password
        )

    async def _fill_database(self, conn: Conn, tenant_id: str, name: str) -> None:
        database, app = quote_ident(name), quote_ident(self.app_role)
        await self._step(tenant_id, "database")
        await conn.execute(f"""
            REVOKE ALL ON DATABASE {database} FROM PUBLIC;
            GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {app};
            """)
        inside = await asyncpg.connect(with_database(self._admin_dsn, name))
        try:
            await inside.execute(f"""
                REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                CREATE TABLE public.notes (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    body text NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now()
                );
                GRANT USAGE ON SCHEMA public TO {app};
                GRANT SELECT, INSERT ON public.notes TO {app};
                """)
        finally:
            await inside.close()
        await self._step(tenant_id, "tables")
        await self._mark_ready(conn, tenant_id)

    async def _undo(self, tenant_id: str, name: str, *, drop_database: bool) -> None:
        """Remove a failed provisioning: its row, and the database it may have created.

        Runs on a connection of its own: the provisioning's may be the reason it failed. The
        transactional models' objects went with their transaction's rollback.
        """
        try:
            async with self._control().acquire() as conn:
                if drop_database:
                    await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
                await conn.execute(
                    f"DELETE FROM {self._tenants} WHERE id = $1 AND state = 'provisioning'",
                    tenant_id,
                )
        except Exception:
            logger.exception("could not undo the failed provisioning of %r", tenant_id)

    async def _sweep(self) -> None:
        """Remove provisionings a crash cut short (rows still ``provisioning``, unlocked)."""
        async with self._control().acquire() as conn:
            rows = await conn.fetch(
                f"SELECT id, isolation, object_name FROM {self._tenants}"
                " WHERE state = 'provisioning'"
            )
            for row in rows:
                lock = _lock_key(self.prefix, row["id"])
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                    continue  # being provisioned right now, by another process
                try:
                    await self._drop_objects(conn, row["isolation"], row["object_name"])
                    await conn.execute(
                        f"DELETE FROM {self._tenants} WHERE id = $1 AND state = 'provisioning'",
                        row["id"],
                    )
                    logger.warning("removed the unfinished provisioning of %r", row["id"])
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock)

    async def _drop_objects(self, conn: Conn, isolation: str, name: str) -> None:
        ident = quote_ident(name)
        if isolation == "database":
            await conn.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
        elif isolation == "schema":
            await conn.execute(f"DROP SCHEMA IF EXISTS {ident} CASCADE")
        elif isolation == "role":
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
                schema = quote_ident(self.role_schema)
                await conn.execute(f"""
                    REVOKE ALL ON {schema}.notes FROM {ident};
                    REVOKE ALL ON SCHEMA {schema} FROM {ident};
                    DROP ROLE {ident};
                    """)
            await conn.execute(f"DELETE FROM {self._secrets} WHERE role = $1", name)
