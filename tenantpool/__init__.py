"""Async multi-tenant PostgreSQL connection manager on asyncpg."""

from ._errors import (
    ConnectionReleased,
    InvalidTenant,
    ManagerClosed,
    NoCurrentConnection,
    PoolTimeout,
    TenantPoolError,
    TenantUnavailable,
    UnknownTenant,
)
from ._manager import ManagerStats, TenantPoolManager
from ._pool import PoolStats
from ._scope import TenantConnection
from ._settings import PoolSettings, Target, redact_dsn
from ._tenant import Resolver, validate_tenant_id

__all__ = [
    "ConnectionReleased",
    "InvalidTenant",
    "ManagerClosed",
    "ManagerStats",
    "NoCurrentConnection",
    "PoolSettings",
    "PoolStats",
    "PoolTimeout",
    "Resolver",
    "Target",
    "TenantConnection",
    "TenantPoolError",
    "TenantPoolManager",
    "TenantUnavailable",
    "UnknownTenant",
    "redact_dsn",
    "validate_tenant_id",
]

__version__ = "0.1.0"
