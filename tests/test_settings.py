"""Target, PoolSettings and DSN redaction: validation and nothing secret in reprs."""

from __future__ import annotations

import dataclasses

import pytest

from tenantpool import PoolSettings, Target, redact_dsn

SECRET = "s3cr3t-p4ss"


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (f"postgresql://acme:{SECRET}@db:5432/app", "postgresql://acme@db:5432/app"),
        (
            f"postgres://acme:{SECRET}@db/app?sslmode=require",
            "postgres://acme@db/app?sslmode=require",
        ),
        (f"postgresql://acme@db/app?password={SECRET}&x=1", "postgresql://acme@db/app?x=1"),
        (
            f"postgresql://acme:{SECRET}@h1:5432,h2:5433/app",
            "postgresql://acme@h1:5432,h2:5433/app",
        ),
        ("postgresql://acme:p%40ss@db/app", "postgresql://acme@db/app"),
        (f"host=db user=acme password={SECRET} dbname=app", "host=db user=acme dbname=app"),
        (f"host=db password='{SECRET} x' dbname=app", "host=db dbname=app"),
        ("postgresql://db/app", "postgresql://db/app"),
    ],
)
def test_redact_dsn_removes_every_password(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_target_repr_and_str_hold_no_password() -> None:
    target = Target(
        f"postgresql://acme:{SECRET}@db/app",
        schema="acme",
        role="acme_role",
        settings={"app.tenant_id": "acme"},
        pool=PoolSettings(max_size=3),
    )
    for text in (repr(target), str(target), repr([target])):
        assert SECRET not in text
        assert "postgresql://acme@db/app" in text


def test_target_session_state_orders_settings_then_schema_then_role() -> None:
    target = Target(
        "postgresql://x@db/app", schema='we"ird', role="r", settings={"b.x": "2", "a.y": "1"}
    )
    assert target.session_state == (
        ("a.y", "1"),
        ("b.x", "2"),
        ("search_path", '"we""ird"'),
        ("role", "r"),
    )
    assert Target("postgresql://x@db/app").session_state == ()


def test_target_settings_are_frozen_copies() -> None:
    settings = {"app.tenant_id": "acme"}
    target = Target("postgresql://x@db/app", settings=settings)
    settings["app.tenant_id"] = "globex"
    assert target.settings["app.tenant_id"] == "acme"
    with pytest.raises(TypeError):
        target.settings["app.tenant_id"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.schema = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dsn": ""},
        {"schema": ""},
        {"schema": "a\x00b"},
        {"schema": "x" * 64},
        {"role": ""},
        {"settings": {"not a name": "x"}},
        {"settings": {"app.x; DROP TABLE t": "x"}},
        {"settings": {"app.x": "a\x00b"}},
        {"settings": {"search_path": "x"}},
        {"settings": {"ROLE": "x"}},
        {"settings": {"app.x": 1}},
    ],
)
def test_target_rejects_bad_input(kwargs: dict[str, object]) -> None:
    args = {"dsn": "postgresql://x@db/app", **kwargs}
    dsn = args.pop("dsn")
    with pytest.raises(ValueError):
        Target(dsn, **args)  # type: ignore[arg-type]


def test_target_rejects_non_pool_settings() -> None:
    with pytest.raises(TypeError):
        Target("postgresql://x@db/app", pool={"max_size": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_size": -1},
        {"max_size": 0},
        {"min_size": 5, "max_size": 4},
        {"acquire_timeout": 0},
        {"connect_timeout": -1},
        {"idle_timeout": 0},
        {"max_age": -5},
        {"keepalive_interval": 0},
        {"max_age_jitter": 1.0},
        {"max_age_jitter": -0.1},
    ],
)
def test_pool_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PoolSettings(**kwargs)  # type: ignore[arg-type]


def test_pool_settings_defaults_match_the_contract() -> None:
    s = PoolSettings()
    assert (s.min_size, s.max_size, s.acquire_timeout, s.connect_timeout) == (0, 10, 10.0, 5.0)
    assert (s.idle_timeout, s.max_age, s.max_age_jitter, s.keepalive_interval) == (
        300.0,
        3600.0,
        0.1,
        60.0,
    )
    assert PoolSettings(idle_timeout=None, max_age=None, keepalive_interval=None).max_age is None
