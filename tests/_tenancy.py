"""Tenants that carry all three kinds of tenant state at once, and the query that checks them.

Each tenant ``t`` has an RLS setting (``app.tenant_id = t``), a schema of its own (``s_t``, a
table ``items`` holding only ``t``'s rows) and a role of its own (``r_t``, a member of the login
user, allowed into its own schema only). One query then shows, per checkout, whether every part
of the tenant's state is its own: the setting, ``current_schema()``, ``current_user``, and the rows
that RLS and the search path let it see. Any other tenant's state shows up as a mismatch, and a
missing one as an error or an empty answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _postgres import PostgresCluster, quote_ident, quote_literal, unique_name

from tenantpool import PoolSettings, Target

__all__ = ["CHECK_SQL", "Tenancy", "observed"]

CHECK_SQL = """
SELECT pg_catalog.current_setting('app.tenant_id', true) AS setting,
       pg_catalog.current_schema()::text AS schema,
       current_user::text AS role,
       (SELECT pg_catalog.array_agg(DISTINCT tenant ORDER BY tenant) FROM public.{notes}) AS rls,
       (SELECT pg_catalog.array_agg(DISTINCT tenant ORDER BY tenant) FROM items) AS own
"""


@dataclass
class Tenancy:
    """The roles, schemas and RLS table of ``count`` tenants on the test cluster."""

    pg: PostgresCluster
    count: int
    prefix: str = field(default_factory=lambda: unique_name("tx")[-10:])
    login: str = ""
    password: str = ""
    notes: str = ""
    tenants: list[str] = field(default_factory=list)

    def schema(self, tenant: str) -> str:
        return f"s_{self.prefix}_{tenant}"

    def role(self, tenant: str) -> str:
        return f"r_{self.prefix}_{tenant}"

    @property
    def check_sql(self) -> str:
        return CHECK_SQL.format(notes=quote_ident(self.notes))

    async def create(self) -> Tenancy:
        self.login = unique_name("txlogin")
        self.password = "pw-" + unique_name()
        self.notes = unique_name("notes")
        self.tenants = [f"t{i}" for i in range(self.count)]
        pg, login, notes = self.pg, quote_ident(self.login), quote_ident(self.notes)
        await pg.create_role(self.login, self.password)
        statements = [
            f"CREATE TABLE public.{notes} (tenant text NOT NULL, body text)",
            f"ALTER TABLE public.{notes} ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY own ON public.{notes}"
            " USING (tenant = pg_catalog.current_setting('app.tenant_id', true))",
            f"GRANT SELECT, INSERT ON public.{notes} TO {login}",
        ]
        for tenant in self.tenants:
            schema, role = quote_ident(self.schema(tenant)), quote_ident(self.role(tenant))
            statements += [
                f"CREATE ROLE {role} NOLOGIN",
                f"GRANT {role} TO {login}",
                f"GRANT SELECT, INSERT ON public.{notes} TO {role}",
                f"CREATE SCHEMA {schema}",
                f"GRANT USAGE ON SCHEMA {schema} TO {role}, {login}",
                f"CREATE TABLE {schema}.items (tenant text NOT NULL)",
                f"GRANT SELECT, INSERT ON {schema}.items TO {role}, {login}",
                f"INSERT INTO {schema}.items VALUES ({quote_literal(tenant)})",
                f"INSERT INTO public.{notes} VALUES ({quote_literal(tenant)}, 'note')",
            ]
        conn = await pg.connect()
        try:
            await conn.execute(";".join(statements))
        finally:
            await conn.close()
        return self

    async def drop(self) -> None:
        conn = await self.pg.connect()
        try:
            statements = [f"DROP TABLE IF EXISTS public.{quote_ident(self.notes)}"]
            for tenant in self.tenants:
                statements += [
                    f"DROP SCHEMA IF EXISTS {quote_ident(self.schema(tenant))} CASCADE",
                    f"DROP ROLE IF EXISTS {quote_ident(self.role(tenant))}",
                ]
            await conn.execute(";".join(statements))
        finally:
            await conn.close()
        await self.pg.drop_role(self.login)

    def targets(self, dsn: str, pool: PoolSettings | None = None) -> dict[str, Target]:
        """Every tenant on ``dsn`` (one shared pool), with its setting, schema and role."""
        return {
            t: Target(
                dsn,
                settings={"app.tenant_id": t},
                schema=self.schema(t),
                role=self.role(t),
                pool=pool,
            )
            for t in self.tenants
        }

    def expected(self, tenant: str) -> tuple[object, ...]:
        """What ``check_sql`` shows for ``tenant`` when its state, and only its, is in force."""
        return (tenant, self.schema(tenant), self.role(tenant), [tenant], [tenant])


def observed(row: object) -> tuple[object, ...]:
    """A ``CHECK_SQL`` row as a tuple comparable with ``expected``."""
    return tuple(row)  # type: ignore[call-overload]
