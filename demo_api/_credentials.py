"""Passwords and URLs: generated passwords, SCRAM verifiers, a DSN with other credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["new_password", "scram_verifier", "with_database", "with_user"]


def new_password() -> str:
    """A fresh random password (192 bits, URL-safe characters)."""
    return secrets.token_urlsafe(24)


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, 7677).

    ``CREATE ROLE ... PASSWORD '<verifier>'`` sets the password without the clear text ever
    reaching the server, so it cannot end up in the server's log of a failed statement.
    (``password`` must be ASCII: PostgreSQL's SASLprep leaves ASCII unchanged.)
    """
    if not password.isascii():
        raise ValueError("password must be ASCII")
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def with_user(dsn: str, user: str, password: str | None) -> str:
    """``dsn`` (a ``postgresql://`` URL) logging in as ``user`` with ``password``."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{auth}@{hosts}", parts.path, parts.query, parts.fragment))


def with_database(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) connecting to ``database``, same credentials."""
    parts = urlsplit(dsn)
    path = "/" + quote(database, safe="")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))
