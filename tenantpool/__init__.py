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
from ._health import HealthReport
from ._manager import TenantPoolManager
from ._scope import TenantConnection
from ._settings import PoolSettings, Target, redact_dsn
from ._stats import ManagerStats, PoolStats, WaitTimes
from ._tenant import Resolver, validate_tenant_id

__all__ = [
    "ConnectionReleased",
    "HealthReport",
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
    "WaitTimes",
    "redact_dsn",
    "validate_tenant_id",
]

__version__ = "0.1.0"
