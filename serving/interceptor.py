"""One server interceptor for every rnnlab service: auth, request parsing, the status table, counting.

For a call of a method under ``/rnnlab.``, in this order:
1. bearer auth (when configured) from the metadata, before a byte of the request is parsed and before
   an unknown method is answered UNIMPLEMENTED (no method enumeration without a token);
2. the request bytes are parsed here, so a malformed message (bad UTF-8 in a string, garbage) gets
   INVALID_ARGUMENT "request is not a valid rnnlab.v1.X: ..." instead of grpc's UNKNOWN;
3. the servicer runs; what it raises goes through ``serving.status`` (unexpected exceptions: INTERNAL,
   plain message to the client, traceback in the log);
4. responses are serialised here too, so the code counted in ``rnnlab_requests{method,code}`` is the code
   the client received, for every service.
Health and reflection only pass step 1. Malformed requests are logged at most once per ``LOG_EVERY_S``.
While the server drains (SIGTERM), new calls get UNAVAILABLE and ``wait_idle`` waits for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from prometheus_client import Counter

from serving.auth import UNAUTHENTICATED_MESSAGE, BearerAuth
from serving.status import INTERNAL, Code, Refusal, Status, abort, status_for

log = logging.getLogger("rnnlab.serve")
LOG_EVERY_S = 10.0
_UNAUTHENTICATED = Status(Code.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "UNAUTHENTICATED")
_COUNTED_PREFIX = "/rnnlab."


class RateLimitedLog:
    """Logs a warning at most once per ``every_s`` seconds, saying how many were left out meanwhile."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._skipped += 1
            return
        suffix = f" ({self._skipped} more since the last such message)" if self._skipped else ""
        self._last, self._skipped = now, 0
        log.warning(message + suffix, *args)


class _Outcome:
    """The status code one call ends with (what is counted)."""

    def __init__(self) -> None:
        self.code = Code.OK


class CallInterceptor(grpc.aio.ServerInterceptor):
    """``labels``: full service name -> the label prefix in ``rnnlab_requests`` (e.g. GenerationService)."""

    def __init__(self, requests: Counter, labels: Mapping[str, str], auth: BearerAuth | None = None) -> None:
        self._requests = requests
        self._labels = labels
        self._auth = auth
        self._malformed = RateLimitedLog()
        self.draining = False  # set at SIGTERM: new calls get UNAVAILABLE, calls in flight go on
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the calls in flight to end -> whether they all did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if self._auth is not None and not self._auth.allows(method, details.invocation_metadata):
            handler = await continuation(details)
            if handler is not None:  # unknown names are not counted: clients could mint labels without end
                self._count(self._counting_label(method), Code.UNAUTHENTICATED)
            return _denying(handler)
        handler = await continuation(details)
        if handler is None or not method.startswith(_COUNTED_PREFIX):
            return handler
        return self._guarded(handler, self._counting_label(method))

    def _counting_label(self, method: str) -> str | None:
        if not method.startswith(_COUNTED_PREFIX):
            return None
        service, _, name = method[1:].partition("/")
        return f"{self._labels.get(service, service)}.{name}"

    def _count(self, label: str | None, code: grpc.StatusCode) -> None:
        if label is not None:
            self._requests.labels(label, code.name).inc()

    def _parser(self, handler: grpc.RpcMethodHandler, label: str) -> Callable[[bytes], object]:
        deserialize = handler.request_deserializer
        type_name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        type_name = type_name.full_name if type_name is not None else "request"

        def parse(raw: bytes) -> object:
            try:
                return deserialize(raw) if deserialize is not None else raw
            except Exception as exc:  # DecodeError, or UnicodeDecodeError for a bad string field
                reason = _plain_decode_reason(exc)
                self._malformed.warning("malformed %s request: %s", label, reason)
                message = f"request is not a valid {type_name}: {reason}"
                raise Refusal(Code.INVALID_ARGUMENT, message, "MALFORMED_REQUEST") from None

        return parse

    def _guarded(self, handler: grpc.RpcMethodHandler, label: str) -> grpc.RpcMethodHandler:
        parse, serialize = self._parser(handler, label), handler.response_serializer or (lambda m: m)
        answering = self._answering

        if handler.request_streaming:

            async def requests(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[object]:
                async for raw in raw_iterator:
                    yield parse(raw)

            behaviour = handler.stream_stream or handler.stream_unary
        else:
            behaviour = handler.unary_unary or handler.unary_stream

        def arguments(raw: object) -> object:
            return requests(raw) if handler.request_streaming else parse(raw)

        if handler.response_streaming:

            async def stream(raw: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
                async with answering(label, context):
                    async for message in behaviour(arguments(raw), context):
                        yield serialize(message)

            run = stream
        else:

            async def unary(raw: object, context: grpc.aio.ServicerContext) -> bytes:
                async with answering(label, context):
                    return serialize(await behaviour(arguments(raw), context))

            run = unary
        return _handler(handler.request_streaming, handler.response_streaming, run)

    @contextlib.asynccontextmanager
    async def _answering(self, label: str, context: grpc.aio.ServicerContext):
        """Maps what the call raises to its status and counts the status the client receives."""
        outcome = _Outcome()
        self._active += 1
        self._idle.clear()
        try:
            if self.draining:
                raise Refusal(
                    Code.UNAVAILABLE,
                    "server is shutting down: retry on another replica",
                    "SERVER_DRAINING",
                    retry_s=0.0,
                )
            yield outcome
        except asyncio.CancelledError:  # client cancel or deadline: frees everything (finally blocks)
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            outcome.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
            raise
        except grpc.aio.AbortError:  # a servicer that aborted by itself (health-style code paths)
            outcome.code = context.code() or Code.UNKNOWN
            raise
        except Exception as exc:
            status = status_for(exc)
            if status is None:
                log.error("internal error in %s", label, exc_info=exc)
                status = INTERNAL
            outcome.code = status.code
            await abort(context, status)
        finally:
            self._count(label, outcome.code)
            self._active -= 1
            if self._active == 0:
                self._idle.set()


def _plain_decode_reason(exc: Exception) -> str:
    """The parser's complaint without Python class names, e.g. "string field had bad UTF-8"."""
    _, _, reason = str(exc).rpartition(": ")
    reason = reason.strip().rstrip(".")
    return reason[:1].lower() + reason[1:80] if reason else "the bytes are not a message of that type"


def _handler(
    request_streaming: bool,
    response_streaming: bool,
    behaviour: Callable,
) -> grpc.RpcMethodHandler:
    """A method handler of the given kind with no (de)serialisers: the behaviour sees and returns bytes."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return make[(request_streaming, response_streaming)](behaviour)


def _denying(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """UNAUTHENTICATED without reading the request, for known and unknown methods alike."""
    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await abort(context, _UNAUTHENTICATED)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await abort(context, _UNAUTHENTICATED)
        yield b""  # an async generator, as streaming handlers are

    return _handler(streaming_in, streaming_out, deny_stream if streaming_out else deny)
