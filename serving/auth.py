"""Bearer-token authentication of gRPC calls (checked by ``serving.interceptor`` before any parsing)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)  # load balancers probe health without credentials


class BearerAuth:
    """Accepts ``authorization: Bearer <token>`` metadata; the scheme is case-insensitive (RFC 6750)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]

    def allows(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        if method.startswith(EXEMPT_PREFIXES):
            return True
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values or not isinstance(values[0], str):
            return False
        scheme, _, offered = values[0].partition(" ")
        if scheme.lower() != "bearer":
            return False
        offered_bytes = offered.strip().encode("utf-8")
        return any(hmac.compare_digest(offered_bytes, token) for token in self._tokens)
