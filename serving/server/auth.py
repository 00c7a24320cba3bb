"""Bearer-token auth: with API keys configured, each request names its key and a session belongs to it.

`caller_owner` is the one FastAPI dependency every route uses to resolve the caller; the ingress process
configures it once at start (`configure`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header

from serving.server.protocol import APIError


def owner_of(key: str) -> str:
    """A stable, non-reversible owner id for a key, so stored records never hold the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class Authenticator:
    def __init__(self, api_keys: tuple[str, ...] | list[str]) -> None:
        self._keys = tuple(k for k in api_keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str | None:
        """None when auth is off; otherwise the caller's owner id, or 401."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "unauthorized", "missing API key: send the header 'Authorization: Bearer <key>'")
        if not any(hmac.compare_digest(token.strip(), key) for key in self._keys):
            raise APIError(401, "unauthorized", "invalid API key")
        return owner_of(token.strip())


# The ingress process' authenticator. Reached as a module attribute for the same reason as metrics.METRICS:
# Ray pickles the FastAPI app by value, while this module is imported normally in the replica.
AUTHENTICATOR = Authenticator(())


def configure(api_keys: tuple[str, ...]) -> None:
    global AUTHENTICATOR
    AUTHENTICATOR = Authenticator(api_keys)


def caller_owner(authorization: Annotated[str | None, Header()] = None) -> str | None:
    """FastAPI dependency: the caller's owner id (None with auth off), or 401."""
    return AUTHENTICATOR.owner(authorization)


Owner = Annotated[str | None, Depends(caller_owner)]
