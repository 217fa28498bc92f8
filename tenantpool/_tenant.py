"""Tenant ids: validation, and the resolver that maps an id to its ``Target``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeAlias

from ._errors import InvalidTenant, UnknownTenant
from ._settings import Target

__all__ = ["Resolver", "TenantResolver", "validate_tenant_id"]

_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")

Resolver: TypeAlias = (
    Mapping[str, Target]
    | Callable[[str], Target | None]
    | Callable[[str], Awaitable[Target | None]]
)


def validate_tenant_id(tenant: object) -> str:
    """Return ``tenant`` if it is a well-formed tenant id, else raise ``InvalidTenant``."""
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if isinstance(tenant, str) and _TENANT_ID.fullmatch(tenant):
        return tenant
    shown = repr(tenant) if isinstance(tenant, str) else type(tenant).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InvalidTenant(
        f"invalid tenant id {shown}: expected 1-63 characters of letters, digits, '_' or '-',"
        " starting with a letter or digit"
    )


class TenantResolver:
    """Adapts a mapping, a sync callable or an async callable to one async lookup."""

    __slots__ = ("_call", "_mapping")

    def __init__(self, resolver: Resolver) -> None:
        self._mapping: Mapping[str, Target] | None = None
        self._call: Callable[[str], object] | None = None
        if isinstance(resolver, Mapping):
            self._mapping = resolver
        elif callable(resolver):
            self._call = resolver
        else:
            raise TypeError(
                "resolver must be a Mapping[str, Target] or a (sync or async) callable, "
                f"got {type(resolver).__name__}"
            )

    @property
    def is_mapping(self) -> bool:
        return self._mapping is not None

    async def resolve(self, tenant: str) -> Target:
        """Return the ``Target`` of an already validated tenant id, or raise ``UnknownTenant``."""
        if self._mapping is not None:
            target: object = self._mapping.get(tenant)
        else:
            assert self._call is not None
            target = self._call(tenant)
            if inspect.isawaitable(target):
                target = await target
        if target is None:
            raise UnknownTenant(f"unknown tenant {tenant!r}")
        if not isinstance(target, Target):
            raise TypeError(
                f"resolver returned {type(target).__name__} for tenant {tenant!r}; "
                "expected a Target or None"
            )
        return target
