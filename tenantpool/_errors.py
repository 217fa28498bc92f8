"""The exception tree: one root, shallow families, one sentence each."""

from __future__ import annotations

__all__ = [
    "ConnectionReleased",
    "InvalidTenant",
    "ManagerClosed",
    "NoCurrentConnection",
    "PoolTimeout",
    "TenantPoolError",
    "TenantUnavailable",
    "UnknownTenant",
]


class TenantPoolError(Exception):
    """Base class of every error tenantpool raises."""


class InvalidTenant(TenantPoolError, ValueError):
    """Raised when a tenant id is not a string matching ``^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$``."""


class UnknownTenant(TenantPoolError, LookupError):
    """Raised when the resolver does not know a (well-formed) tenant id."""


class NoCurrentConnection(TenantPoolError):
    """Raised when code asks for the current connection outside any scope of its own task."""


class ConnectionReleased(TenantPoolError):
    """Raised when a connection is used after the scope that checked it out has ended."""


class ManagerClosed(TenantPoolError):
    """Raised when a checkout is attempted on a manager that is closed or not started."""


class _RetryableError(TenantPoolError):
    """A failure that may go away: carries ``retry_after``, a hint in seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PoolTimeout(_RetryableError, TimeoutError):
    """Raised when no connection could be had within ``acquire_timeout``."""


class TenantUnavailable(_RetryableError):
    """Raised when a tenant's server cannot be reached or refuses connections."""
