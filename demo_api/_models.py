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
    "TargetInfo",
    "TenantCreate",
    "TenantCreated",
    "TenantDetail",
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


class NoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body: str = Field(min_length=1, max_length=10_000, examples=["hello"])


class Note(BaseModel):
    id: int
    body: str
    tenant: str


class DashboardStats(BaseModel):
    """What the dashboard page polls: the cap, the totals, each pool, and health."""

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
