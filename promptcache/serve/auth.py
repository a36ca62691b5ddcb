"""API and admin keys: ``Authorization: Bearer <key>``, compared in constant time.

Two levels: the API key lets a client generate and read schemas; the admin key also lets it add
and delete schemas (it is accepted wherever the API key is). Keys are compared as UTF-8 bytes with
:func:`hmac.compare_digest`, so the time taken does not tell how much of a guess was right.
"""

from __future__ import annotations

import hmac


class AuthError(Exception):
    """The request's key is missing or wrong (401), or an admin action is off (403)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison (on bytes: ``compare_digest`` refuses non-ASCII ``str``)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_api_key(authorization: str | None, api_key: str | None, admin_key: str | None) -> None:
    """Raise :class:`AuthError` unless the request may use the API (open when no API key is set)."""
    if api_key is None:
        return
    token = bearer_token(authorization)
    # Both comparisons always run: which key matched must not show in the timing either.
    ok_api = key_matches(token, api_key)
    ok_admin = admin_key is not None and key_matches(token, admin_key)
    if not (ok_api or ok_admin):
        raise AuthError("missing API key (send Authorization: Bearer <key>)" if token is None
                        else "invalid API key")


def check_admin_key(authorization: str | None, admin_key: str | None) -> None:
    """Raise :class:`AuthError` unless the request carries the admin key (403 when none is set)."""
    if admin_key is None:
        raise AuthError("admin changes over HTTP (schemas, adapters) are disabled: start the server with --admin-key "
                        "(or PROMPTCACHE_ADMIN_KEY)", status=403)
    token = bearer_token(authorization)
    if not key_matches(token, admin_key):
        raise AuthError("missing admin key (send Authorization: Bearer <admin key>)" if token is None
                        else "invalid admin key")
