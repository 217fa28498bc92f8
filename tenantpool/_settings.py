"""What a tenant connects to (``Target``), how its pool behaves (``PoolSettings``), redaction."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

__all__ = [
    "DsnParts",
    "PoolSettings",
    "SessionState",
    "StateScope",
    "Target",
    "dsn_secrets",
    "parse_dsn",
    "redact_dsn",
    "server_address",
]

StateScope = Literal["session", "transaction"]

# The session state a checkout applies: ordered (setting, value) pairs for set_config().
SessionState = tuple[tuple[str, str], ...]

# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes; reject them rather than
# letting two long names silently collapse into one.
_MAX_IDENTIFIER_BYTES = 63
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*")
# Applied through dedicated fields, so that reset and setup handle them deliberately.
_RESERVED_SETTINGS = frozenset({"role", "search_path", "session_authorization"})


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How one target's pool behaves; all times are in seconds."""

    min_size: int = 0
    max_size: int = 10
    acquire_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = 300.0
    max_age: float | None = 3600.0
    max_age_jitter: float = 0.1
    keepalive_interval: float | None = 60.0
    # "transaction": each scope is one transaction carrying the tenant's state transaction-
    # locally, and nothing is left on the server session (safe behind transaction poolers).
    state_scope: StateScope = "session"

    def __post_init__(self) -> None:
        if self.state_scope not in ("session", "transaction"):
            raise ValueError(
                f"state_scope must be 'session' or 'transaction', got {self.state_scope!r}"
            )
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})"
            )
        for name in ("acquire_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("idle_timeout", "max_age", "keepalive_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if not 0.0 <= self.max_age_jitter < 1.0:
            raise ValueError(f"max_age_jitter must be in [0, 1), got {self.max_age_jitter}")


def _check_identifier(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    if "\x00" in value:
        raise ValueError(f"{kind} must not contain NUL characters")
    if len(value.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(f"{kind} must be at most {_MAX_IDENTIFIER_BYTES} bytes: {value!r}")


def quote_identifier(name: str) -> str:
    """Quote ``name`` as a PostgreSQL identifier, whatever characters it holds."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True, eq=True)
class Target:
    """Where and as whom a tenant connects, and the session state its checkouts carry."""

    dsn: str
    schema: str | None = None
    role: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    pool: PoolSettings | None = None
    max_in_use: int | None = None
    session_state: SessionState = field(init=False, repr=False, compare=False)
    # Identifies the pool: the DSN with its credentials, digested so that no dict key, debugger
    # or locals-printing traceback shows a password.
    pool_key: bytes = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        role: str | None = None,
        settings: Mapping[str, str] | None = None,
        pool: PoolSettings | None = None,
        max_in_use: int | None = None,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("dsn must be a non-empty string")
        parse_dsn(dsn)  # refuses, before any connect, a DSN asyncpg would misread
        if schema is not None:
            _check_identifier("schema", schema)
        if role is not None:
            _check_identifier("role", role)
        frozen_settings = MappingProxyType(dict(settings or {}))
        for name, value in frozen_settings.items():
            if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"invalid setting name: {name!r}")
            if name.lower() in _RESERVED_SETTINGS:
                raise ValueError(f"set {name!r} through Target's own field, not settings")
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"setting {name!r} must be a string without NUL characters")
        if pool is not None and not isinstance(pool, PoolSettings):
            raise TypeError("pool must be a PoolSettings")
        if max_in_use is not None and (
            not isinstance(max_in_use, int) or isinstance(max_in_use, bool) or max_in_use < 1
        ):
            raise ValueError(f"max_in_use must be an int >= 1 or None, got {max_in_use!r}")
        object.__setattr__(self, "dsn", dsn)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "settings", frozen_settings)
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "max_in_use", max_in_use)
        # Settings first, role last: the login user may set what the tenant's role may not.
        state = [(name, frozen_settings[name]) for name in sorted(frozen_settings)]
        if schema is not None:
            state.append(("search_path", quote_identifier(schema)))
        if role is not None:
            state.append(("role", role))
        object.__setattr__(self, "session_state", tuple(state))
        object.__setattr__(self, "pool_key", hashlib.blake2b(dsn.encode(), digest_size=20).digest())

    def __repr__(self) -> str:
        parts = [repr(redact_dsn(self.dsn))]
        if self.schema is not None:
            parts.append(f"schema={self.schema!r}")
        if self.role is not None:
            parts.append(f"role={self.role!r}")
        if self.settings:
            parts.append(f"settings={dict(self.settings)!r}")
        if self.pool is not None:
            parts.append(f"pool={self.pool!r}")
        if self.max_in_use is not None:
            parts.append(f"max_in_use={self.max_in_use}")
        return f"Target({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class DsnParts:
    """A URL DSN read the way asyncpg reads it: the connection parameters, password apart."""

    scheme: str
    user: str
    password: str
    hosts: tuple[tuple[str, str], ...]  # (host, port), port "" when not given
    database: str
    params: tuple[tuple[str, str], ...]  # the query, in order


_URL_SCHEMES = ("postgresql", "postgres")
# Query parameters that hold a secret: never shown, scrubbed from messages.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_AMBIGUOUS = (
    "the DSN is ambiguous: {why}. asyncpg and libpq may read a different user, password or"
    " host from it; percent-encode the password (urllib.parse.quote(password, safe=''))"
)


# Cached: a resolver may build a new Target of the same DSN for every lookup.
@functools.lru_cache(maxsize=1024)
def parse_dsn(dsn: str) -> DsnParts:
    """Read a ``postgresql://`` DSN as asyncpg does, refusing one it may read otherwise.

    asyncpg splits a URL at its first ``#``, ``?`` and ``/`` before it looks for the user info,
    then takes the text up to the *first* ``@``; libpq reads ``#`` and ``?`` as part of the
    password. A password holding an unencoded ``#``, ``?``, ``/`` or ``@`` therefore yields a
    different host, or a password read as a host name and shown in errors. Such DSNs, and any
    ``@`` past the host part, raise ``ValueError``, whose message quotes nothing of the DSN.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() not in _URL_SCHEMES:
        raise ValueError(
            "dsn must be a postgresql:// or postgres:// URL (asyncpg reads no other form)"
        )
    if "#" in rest:
        raise ValueError(_AMBIGUOUS.format(why="it holds a '#' (write it as %23)"))
    netloc = re.split(r"[/?]", rest, maxsplit=1)[0]
    after = rest[len(netloc) :]
    if "@" in after or netloc.count("@") > 1:
        raise ValueError(
            _AMBIGUOUS.format(why="an '@' is not the one ending the user info (write it as %40)")
        )
    userinfo, _, hostspec = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    path, _, query = after.partition("?")
    try:
        params = tuple(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise ValueError("the DSN's query string is malformed") from None
    return DsnParts(
        scheme=scheme,
        user=unquote(user),
        password=unquote(password),
        hosts=_parse_hosts(hostspec),
        database=unquote(path[1:]),
        params=params,
    )


def _parse_hosts(hostspec: str) -> tuple[tuple[str, str], ...]:
    hosts = []
    for spec in hostspec.split(",") if hostspec else ():
        if spec.startswith("["):  # [IPv6]:port
            address, _, port = spec[1:].partition("]")
            port = port.removeprefix(":")
        else:
            address, _, port = spec.partition(":")
        port = unquote(port)
        if port and not port.isdigit():
            # Its text is not shown: with the user info written wrong it may be a password.
            raise ValueError("the DSN's host part holds a port that is not a number")
        hosts.append((unquote(address), port))
    return tuple(hosts)


def _format_hosts(hosts: tuple[tuple[str, str], ...]) -> str:
    return ",".join(
        (f"[{host}]" if ":" in host else quote(host, safe="")) + (f":{port}" if port else "")
        for host, port in hosts
    )


def redact_dsn(dsn: str) -> str:
    """``dsn`` rebuilt from its parsed parameters without any password: for names, logs, errors.

    A ``postgresql://`` URL keeps its user, hosts, ports, database and non-secret query
    parameters; a libpq ``key=value`` string keeps its non-secret pairs. A URL whose reading is
    ambiguous raises ``ValueError`` (see ``parse_dsn``) rather than guess what is secret.
    """
    if "://" not in dsn:
        pairs = [(k, v) for k, v in _conninfo_pairs(dsn) if k.lower() not in _SECRET_PARAMS]
        return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in pairs)
    parts = parse_dsn(dsn)
    user = f"{quote(parts.user, safe='')}@" if parts.user else ""
    database = f"/{quote(parts.database, safe='')}" if parts.database else ""
    params = [(k, v) for k, v in parts.params if k.lower() not in _SECRET_PARAMS]
    query = f"?{urlencode(params)}" if params else ""
    return f"{parts.scheme}://{user}{_format_hosts(parts.hosts)}{database}{query}"


def server_address(dsn: str) -> str:
    """Where ``dsn`` connects (hosts and ports), without user, database or options.

    Pools whose DSNs share it share a server: when one of them finds the server back after an
    outage, the others need not wait out their own backoff.
    """
    parts = parse_dsn(dsn)
    hosts = parts.hosts
    query = {k.lower(): v for k, v in parts.params}
    if not hosts and "host" in query:  # as asyncpg: the query's host only without a URL host
        hosts = _parse_hosts(query["host"])
    if "port" in query and not any(port for _, port in hosts):
        hosts = tuple((host, query["port"]) for host, _ in hosts) or (("", query["port"]),)
    return _format_hosts(hosts)


def dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The passwords in ``dsn``, in every form they may take in a message, to scrub them."""
    if "://" not in dsn:
        found = [v for k, v in _conninfo_pairs(dsn) if k.lower() in _SECRET_PARAMS]
    else:
        parts = parse_dsn(dsn)
        found = [parts.password]
        found += [v for k, v in parts.params if k.lower() in _SECRET_PARAMS]
    forms = {form for secret in found if secret for form in (secret, quote(secret, safe=""))}
    # Longest first: scrubbing a secret must not leave the tail of a longer form behind.
    return tuple(sorted(forms, key=len, reverse=True))


_CONNINFO_PAIR = re.compile(r"\s*([^\s=]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")


def _conninfo_pairs(dsn: str) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a libpq connection string, values unquoted."""
    pairs = []
    for key, value in _CONNINFO_PAIR.findall(dsn):
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs.append((key, value))
    return pairs


def _conninfo_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
