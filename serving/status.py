"""The one exception -> gRPC status table of every rnnlab service, with google.rpc.Status details.

Servicers raise; they never call ``context.abort`` themselves. ``serving.interceptor`` applies this table
to every call of every service: a ``Refusal`` carries its own code, a known exception type gets the row
of the table, anything else is a bug: INTERNAL with a plain message for the client and the traceback in
the server's log. Every status carries a google.rpc.Status in the ``grpc-status-details-bin`` trailer:
ErrorInfo (domain "rnnlab", a stable ``reason`` a program can branch on), RetryInfo when a retry may
succeed, BadRequest field violations for INVALID_ARGUMENT (the reasons are listed in generation.proto).
Messages quote client values with ``serving.errors.quote`` (at most 80 characters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from serving.engine import EngineStopped, RequestRejected
from serving.sessions import SessionBusy, SessionNotFound, StoreFull
from serving.state_token import TokenError

Code = grpc.StatusCode
DOMAIN = "rnnlab"
INTERNAL_MESSAGE = "internal error (logged on the server)"


@dataclass(frozen=True)
class Status:
    """What a failed call answers. ``fields``: (field path, what is wrong) for BadRequest."""

    code: grpc.StatusCode
    message: str
    reason: str
    fields: tuple[tuple[str, str], ...] = ()
    retry_s: float | None = None

    def details(self) -> grpc.Status:
        """As a grpc.Status whose trailing metadata holds the google.rpc.Status with the details."""
        details = [error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)]
        if self.retry_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.fields:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.fields
                    ]
                )
            )
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, status: Status) -> None:
    """Ends the call with ``status`` and its details (raises, as ``context.abort`` does)."""
    answer = status.details()
    await context.abort(answer.code, answer.details, answer.trailing_metadata)


class Refusal(Exception):
    """A call refused with a gRPC status code and a message for the client; ``reason`` defaults to the
    code's name, ``fields`` name the request fields at fault, ``retry_s`` says a retry may succeed."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        fields: Sequence[tuple[str, str]] = (),
        retry_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = Status(code, message, reason or code.name, tuple(fields), retry_s)

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.code


def invalid(field: str, message: str) -> Refusal:
    """INVALID_ARGUMENT naming the request field at fault (BadRequest)."""
    return Refusal(Code.INVALID_ARGUMENT, message, fields=[(field, message)])


def require_token_version(token_digest: str, model: str, digest: str) -> None:
    """FAILED_PRECONDITION (TOKEN_OTHER_VERSION) unless a state token was made by this very bundle of
    ``model`` (``digest``: serving.bundle.bundle_digest)."""
    if token_digest != digest:
        raise Refusal(
            Code.FAILED_PRECONDITION,
            f"state token is for another version of model {model!r} (bundle digest differs)",
            "TOKEN_OTHER_VERSION",
        )


# The exception types the services let through: (type, code, reason, seconds after which a retry may work)
_TABLE: tuple[tuple[type[Exception], grpc.StatusCode, str, float | None], ...] = (
    (SessionNotFound, Code.NOT_FOUND, "SESSION_NOT_FOUND", None),
    (SessionBusy, Code.ABORTED, "SESSION_BUSY", 0.05),
    (StoreFull, Code.RESOURCE_EXHAUSTED, "SESSIONS_EXHAUSTED", 1.0),
    (RequestRejected, Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", None),
    (EngineStopped, Code.UNAVAILABLE, "MODEL_STOPPING", 1.0),
)


def status_for(exc: BaseException) -> Status | None:
    """-> the Status for an expected exception; None for a bug (the caller answers INTERNAL)."""
    if isinstance(exc, Refusal):
        return exc.status
    if isinstance(exc, TokenError):
        if exc.reason == "signature":
            return Status(Code.PERMISSION_DENIED, str(exc), "TOKEN_SIGNATURE")
        return Status(Code.INVALID_ARGUMENT, str(exc), "TOKEN_MALFORMED", (("token", str(exc)),))
    for kind, code, reason, retry_s in _TABLE:
        if isinstance(exc, kind):
            return Status(code, str(exc), reason, retry_s=retry_s)
    return None


INTERNAL = Status(Code.INTERNAL, INTERNAL_MESSAGE, "INTERNAL")
