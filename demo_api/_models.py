"""The JSON the demo takes and gives, as pydantic models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tenantpool import validate_tenant_id

from ._registry import Isolation

__all__ = [
    "DashboardStats",
    "Note",
    "NoteCreate",
    "PoolFigures",
    "RateSample",
    "TargetInfo",
    "TenantCreate",
    "TenantCreated",
    "TenantDetail",
    "TenantSummary",
]

# tenantpool's check, so the demo and the library agree on what a tenant id is. Its
# InvalidTenant is a ValueError, which pydantic reports as a validation error.
TenantId = Annotated[str, AfterValidator(validate_tenant_id)]


class TenantCreate(BaseModel):
    """``POST /tenants``: a bad ``id`` or ``isolation`` is a 400, anything else a 422."""

    model_config = ConfigDict(extra="forbid")

    id: TenantId = Field(examples=["acme"])
    isolation: Isolation = Field(examples=["rls"])


class TenantCreated(BaseModel):
    id: str
    isolation: Isolation
    created_at: datetime


class TargetInfo(BaseModel):
    """Where a tenant's connections go, without any password."""

    pool: str  # the pool's name: its DSN with the password removed
    schema_: str | None = Field(default=None, alias="schema")
    settings: dict[str, str]

    model_config = ConfigDict(populate_by_name=True)


class PoolFigures(BaseModel):
    name: str
    size: int
    in_use: int
    idle: int
    waiting: int
    min_size: int
    max_size: int


class TenantDetail(TenantCreated):
    """``GET /tenants/{id}``; ``pool`` is null while the tenant's pool does not exist."""

    target: TargetInfo
    pool: PoolFigures | None


def _no_nul(value: str) -> str:
    # Valid JSON that PostgreSQL's text refuses: a 422 here rather than a 500 from the server.
    # (pydantic itself refuses the other such strings, lone surrogates.)
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


class NoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body: Annotated[str, AfterValidator(_no_nul)] = Field(
        min_length=1, max_length=10_000, examples=["hello"]
    )


class Note(BaseModel):
    id: int
    body: str
    tenant: str


class TenantSummary(TenantCreated):
    """An item of ``GET /tenants``: a tenant and the pool its connections come from."""

    pool: str  # the pool's name: its DSN with the password removed


class RateSample(BaseModel):
    """One second of the manager's activity, for the dashboard's sparklines."""

    checkouts_per_s: float
    waiting: int
    in_use: int
    total: int


class DashboardStats(BaseModel):
    """What the dashboard page polls: the cap, the totals, each pool, health, the last minute."""

    status: str
    reasons: list[str]
    cap: int | None
    total: int
    in_use: int
    idle: int
    waiting: int
    checkouts: int
    timeouts: int
    steals: int
    pools: list[PoolFigures]
    history: list[RateSample]  # one sample a second, oldest first
