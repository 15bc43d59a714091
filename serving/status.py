"""The one exception -> gRPC status table of every rnnlab service.

Servicers raise; they never call ``context.abort`` themselves. ``serving.interceptor`` applies this table
to every call of every service: a ``Refusal`` carries its own code, a known exception type gets the code
of the table, anything else is a bug: INTERNAL with a plain message for the client and the traceback in
the server's log. Messages quote client values with ``serving.errors.quote`` (at most 80 characters).
"""

from __future__ import annotations

import grpc

from serving.engine import EngineStopped, RequestRejected
from serving.sessions import SessionBusy, SessionNotFound, StoreFull
from serving.state_token import TokenError

Code = grpc.StatusCode
INTERNAL_MESSAGE = "internal error (logged on the server)"


class Refusal(Exception):
    """A call refused with a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The exception types the services let through, by status code; order matters only for subclasses.
_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SessionNotFound, Code.NOT_FOUND),
    (SessionBusy, Code.ABORTED),
    (StoreFull, Code.RESOURCE_EXHAUSTED),
    (RequestRejected, Code.INVALID_ARGUMENT),
    (EngineStopped, Code.UNAVAILABLE),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """-> (code, message for the client) for an expected exception; None for a bug (INTERNAL)."""
    if isinstance(exc, Refusal):
        return exc.code, exc.message
    if isinstance(exc, TokenError):
        return (Code.PERMISSION_DENIED if exc.reason == "signature" else Code.INVALID_ARGUMENT), str(exc)
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    return None
