"""``rnnlab-serve``: the gRPC server (grpc.aio) over every bundle in a models directory.

Bad bundles are refused with a logged reason while the good ones serve. Standard health checking and
server reflection are on; SIGTERM drains: health turns NOT_SERVING, new calls are refused, calls in
flight get ``grace_s`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import state_token
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.bundle import BundleError, discover_bundles
from serving.config import ConfigError, ServerConfig, load_config
from serving.engine import EngineStopped, Finish, ModelEngine, Request, Stream
from serving.errors import run_command
from serving.metrics import ServerMetrics
from serving.prompt_cache import PromptCache
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from serving.sessions import Session, SessionBusy, SessionNotFound, SessionStore, StoreFull, StoreLimits

log = logging.getLogger("rnnlab.serve")

_FINISH = {Finish.LENGTH: pb.FINISH_REASON_LENGTH, Finish.STOP: pb.FINISH_REASON_STOP,
           Finish.EOS: pb.FINISH_REASON_EOS}
GENERATION_SERVICES = ("rnnlab.v1.Generation", "rnnlab.v1.Sessions")


class Refusal(Exception):
    """A call refused with a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(exc: Exception) -> Refusal:
    """Maps the store's, the token codec's and the engine's exceptions to status codes."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, SessionNotFound):
        return Refusal(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, SessionBusy):
        return Refusal(grpc.StatusCode.ABORTED, str(exc))
    if isinstance(exc, StoreFull):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, state_token.TokenError):
        signature = exc.reason == "signature"
        return Refusal(grpc.StatusCode.PERMISSION_DENIED if signature else grpc.StatusCode.INVALID_ARGUMENT,
                       str(exc))
    if isinstance(exc, EngineStopped):
        return Refusal(grpc.StatusCode.UNAVAILABLE, str(exc))
    log.error("internal error: %r", exc)
    return Refusal(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


_REFUSED = (Refusal, SessionNotFound, SessionBusy, StoreFull, state_token.TokenError, EngineStopped)


@contextlib.asynccontextmanager
async def _answering(service: _Service, name: str, context: grpc.aio.ServicerContext):
    """Turns refusals into status codes and counts every call's outcome."""
    code = "OK"
    try:
        yield
    except _REFUSED as exc:
        refusal = _refusal(exc)
        code = refusal.code.name
        await context.abort(refusal.code, refusal.message)
    except asyncio.CancelledError:  # client cancel or deadline: free everything (finally blocks), re-raise
        code = "CANCELLED"
        raise
    except grpc.aio.AbortError:  # the handler aborted itself: count the status it set
        status = context.code()
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        raise
    except Exception:  # a bug: the client gets INTERNAL, the log gets the traceback, the counter INTERNAL
        code = "INTERNAL"
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")
    finally:
        service.app.metrics.requests.labels(name, code).inc()


def unary(method: Callable) -> Callable:
    async def handler(self: _Service, request: object, context: grpc.aio.ServicerContext) -> object:
        async with _answering(self, f"{type(self).__name__}.{method.__name__}", context):
            return await method(self, request, context)

    handler.__name__ = method.__name__
    return handler


def streaming(method: Callable) -> Callable:
    async def handler(self: _Service, request: object, context: grpc.aio.ServicerContext) -> AsyncIterator:
        async with _answering(self, f"{type(self).__name__}.{method.__name__}", context):
            async for item in method(self, request, context):
                yield item

    handler.__name__ = method.__name__
    return handler


@dataclass
class Model:
    name: str
    runtime: LMRuntime
    engine: ModelEngine
    digest: str
    info: pb.ModelInfo


def bundle_digest(bundle_dir: Path) -> str:
    """sha256 of manifest.json, which lists the sha256 of every file of the bundle."""
    return hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()


def _numbers(data: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON object, nested keys joined with dots."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(data, bool) or not isinstance(data, int | float):
        return {}
    return {prefix.rstrip("."): float(data)}


def model_info(runtime: LMRuntime, digest: str) -> pb.ModelInfo:
    manifest, arch = runtime.manifest, runtime.manifest.architecture
    return pb.ModelInfo(
        name=manifest.name, kind=manifest.kind, cell=str(arch.get("cell", "")), layers=runtime.layers,
        hidden_size=runtime.hidden, embedding_size=int(arch.get("embed", 0)), vocab_size=runtime.vocab_size,
        tokenizer=runtime.tokenizer.kind, bundle_digest=digest,
        evaluation=_numbers(manifest.evaluation or {}),
        architecture_json=json.dumps(arch, sort_keys=True),
        state_bytes=sum(a.nbytes for a in runtime.init_state(1)))


def load_runtimes(models_dir: str | Path, threads: int = 1,
                  ) -> tuple[dict[str, tuple[LMRuntime, str]], list[Path]]:
    """Every good LM bundle under ``models_dir`` (or the bundle ``models_dir`` itself), by manifest name.

    -> ({name: (runtime, digest)}, seq2seq bundle dirs). Bad bundles are logged and skipped.
    """
    models_dir = Path(models_dir)
    found = ([(models_dir.name, models_dir)] if (models_dir / "manifest.json").is_file()
             else discover_bundles(models_dir))
    runtimes: dict[str, tuple[LMRuntime, str]] = {}
    translators: list[Path] = []
    for dirname, entry in found:
        if isinstance(entry, BundleError):
            log.warning("refusing bundle %s: %s", dirname, entry)
            continue
        try:
            if json.loads((entry / "manifest.json").read_text(encoding="utf-8")).get("kind") == "seq2seq":
                translators.append(entry)
                continue
            runtime = LMRuntime.load(entry, threads=threads)
        except (BundleError, ValueError, OSError) as exc:
            log.warning("refusing bundle %s: %s", dirname, exc)
            continue
        name = runtime.manifest.name
        if name in runtimes:
            log.warning("refusing bundle %s: model name %r is already served", dirname, name)
            continue
        runtimes[name] = (runtime, bundle_digest(entry))
        log.info("serving model %r from %s", name, entry)
    return runtimes, translators


class App:
    """Models, engines, the session store, limits and metrics shared by the services."""

    def __init__(self, config: ServerConfig, runtimes: dict[str, tuple[LMRuntime, str]]) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.models: dict[str, Model] = {}
        for name, (runtime, digest) in runtimes.items():
            engine = ModelEngine(name, runtime, self.metrics.for_model(name), config.batch_limit,
                                 config.prefill_chunk, config.flush_ms / 1000,
                                 config.max_messages_per_s,
                                 PromptCache(config.prompt_cache_entries, config.prompt_cache_bytes))
            self.models[name] = Model(name, runtime, engine, digest, model_info(runtime, digest))
        self.sessions = SessionStore(StoreLimits(config.max_sessions, config.max_session_bytes,
                                                 config.session_ttl_s, config.evict_idle_sessions))
        key = state_token.resolve_key(config.state_key)
        if key is None:
            log.warning("no state key configured (state_key / $%s): state tokens are valid on this process "
                        "only", state_token.KEY_ENV)
            key = secrets.token_bytes(32)
        self.state_key = key
        self.active_streams = 0
        self.metrics.active_streams.set_function(lambda: self.active_streams)
        self.metrics.sessions.set_function(lambda: len(self.sessions))
        self.metrics.session_bytes.set_function(lambda: self.sessions.nbytes)
        self.metrics.models.set(len(self.models))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for model in self.models.values():
            model.engine.start(loop)

    def stop(self) -> None:
        for model in self.models.values():
            model.engine.stop()

    # -- validation ---------------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND,
                          f"no model {name!r} (serving: {', '.join(sorted(self.models)) or 'none'})")
        return model

    def encode(self, model: Model, text: str, what: str, allow_empty: bool = False) -> list[int]:
        if not text and not allow_empty:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty")
        if len(text) > self.config.max_prompt_chars:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} has {len(text)} characters, over the limit of "
                          f"{self.config.max_prompt_chars}")
        ids = model.runtime.encode(text) if text else []
        if len(ids) > self.config.max_prompt_tokens:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} has {len(ids)} tokens, over the limit of {self.config.max_prompt_tokens}")
        return ids

    def generation_options(self, max_tokens: int, sampling: pb.SamplingOptions,
                           stop: list[str]) -> tuple[int, SamplingParams, tuple[str, ...]]:
        cap = self.config.max_tokens
        if max_tokens < 0 or max_tokens > cap:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_tokens must be in 0..{cap}, not {max_tokens}")
        top_p = sampling.top_p if sampling.top_p != 0 else 1.0
        if math.isnan(top_p):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], not nan")
        try:
            params = SamplingParams(float(sampling.temperature), int(sampling.top_k), float(top_p),
                                    sampling.seed if sampling.HasField("seed") else None)
        except ValueError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        stops = tuple(s for s in stop if s)
        limit, chars = self.config.max_stop_strings, self.config.max_stop_chars
        if len(stops) > limit or any(len(s) > chars for s in stops):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {limit} stop strings of at most {chars} characters")
        return max_tokens or self.config.default_max_tokens, params, stops

    @contextlib.contextmanager
    def stream_slot(self):
        if self.active_streams >= self.config.max_streams:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy: {self.active_streams} streams running "
                          f"(limit {self.config.max_streams})")
        self.active_streams += 1
        try:
            yield
        finally:
            self.active_streams -= 1

    # -- running requests ---------------------------------------------------------------------------

    async def relay(self, model: Model, stream: Stream, session_tokens: int | None = None,
                    ) -> AsyncIterator[pb.GenerateResponse]:
        """Yields one message per wake-up with everything produced meanwhile; the last one has ``end``.

        Leaving early (client cancel, deadline) takes the stream out of the batch at once.
        """
        try:
            while True:
                await stream.wakeup.wait()
                stream.wakeup.clear()
                text, ids, logprobs = stream.take()
                if stream.error is not None:
                    raise _refusal(stream.error)
                message = pb.GenerateResponse(text=text, token_ids=ids, logprobs=logprobs)
                outcome = stream.outcome
                if outcome is not None:
                    total = 0 if session_tokens is None else session_tokens + outcome.generated_tokens
                    message.end.CopyFrom(pb.GenerationEnd(
                        finish_reason=_FINISH[outcome.finish], prompt_tokens=outcome.prompt_tokens,
                        generated_tokens=outcome.generated_tokens, session_tokens=total))
                    yield message
                    return
                yield message
        finally:
            if not stream.done:
                model.engine.cancel(stream)

    async def read(self, model: Model, request: Request) -> Stream:
        """Runs a prefill-only request (max_tokens 0) to the end; cancels it if the call goes away."""
        stream = model.engine.submit(request)
        try:
            while not stream.done:
                await stream.wakeup.wait()
                stream.wakeup.clear()
        finally:
            if not stream.done:
                model.engine.cancel(stream)
        if stream.error is not None:
            raise _refusal(stream.error)
        return stream

    # -- sessions -----------------------------------------------------------------------------------

    def session_info(self, session: Session, appended: int = 0) -> pb.SessionInfo:
        return pb.SessionInfo(session_id=session.id, model=session.model, tokens=session.tokens,
                              appended_tokens=appended, idle_ttl_seconds=self.config.session_ttl_s)

    async def open_session(self, model_name: str, prompt: str) -> pb.SessionInfo:
        model = self.model(model_name)
        ids = self.encode(model, prompt, "prompt", allow_empty=True)
        session = self.sessions.create(model.name, model.runtime.init_state(1), None, None, 0, busy=True)
        try:
            if ids:
                await self._read_into(model, session, ids, len(ids))
        except BaseException:
            with contextlib.suppress(SessionNotFound):
                self.sessions.close(session.id)
            raise
        self.sessions.release(session)
        return self.session_info(session, len(ids))

    async def _read_into(self, model: Model, session: Session, ids: list[int], counted: int) -> None:
        """Reads ``ids`` (after the pending token, if any) into a busy session."""
        feed = [session.pending, *ids] if session.pending is not None else ids
        # A session that has read nothing is at the initial state: None lets the prompt cache serve it.
        initial = session.tokens == 0 and session.pending is None
        stream = await self.read(model, Request(feed, 0, state=None if initial else session.state))
        outcome = stream.outcome
        session.state, session.logits, session.pending = outcome.state, outcome.logits, None
        session.tokens += counted

    def acquire(self, session_id: str) -> tuple[Session, Model]:
        session = self.sessions.acquire(session_id)
        return session, self.models[session.model]  # sessions exist only on models loaded at start

    async def append(self, session_id: str, text: str) -> pb.SessionInfo:
        session, model = self.acquire(session_id)
        try:
            ids = self.encode(model, text, "text")
            await self._read_into(model, session, ids, len(ids))
            return self.session_info(session, len(ids))
        finally:
            self.sessions.release(session)

    async def session_generate(self, request: pb.SessionGenerateRequest, session_id: str,
                               ) -> AsyncIterator[pb.GenerateResponse]:
        session, model = self.acquire(session_id)
        try:
            ids = self.encode(model, request.text, "text", allow_empty=True)
            max_tokens, params, stops = self.generation_options(request.max_tokens, request.sampling,
                                                                list(request.stop))
            feed = [session.pending, *ids] if session.pending is not None else ids
            if not feed and session.logits is None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              "the session holds no text yet: append text or pass it with the call")
            with self.stream_slot():
                stream = model.engine.submit(Request(feed, max_tokens, params, stops, request.logprobs,
                                                     session.state, None if feed else session.logits))
                base = session.tokens + len(ids)
                async for message in self.relay(model, stream, session_tokens=base):
                    if message.HasField("end"):
                        outcome = stream.outcome
                        session.state, session.logits = outcome.state, outcome.logits
                        session.pending, session.tokens = outcome.pending, base + outcome.generated_tokens
                    yield message
        finally:
            self.sessions.release(session)

    def export_session(self, session_id: str) -> pb.StateToken:
        session, model = self.acquire(session_id)
        try:
            snapshot = state_token.SessionState(model.name, model.digest, session.state, session.logits,
                                                session.pending, session.tokens)
            return pb.StateToken(token=state_token.encode(snapshot, self.state_key), model=model.name,
                                 tokens=session.tokens)
        finally:
            self.sessions.release(session)

    def resume_session(self, token: bytes) -> pb.SessionInfo:
        snapshot = state_token.decode(token, self.state_key)
        model = self.model(snapshot.model)
        if snapshot.bundle_digest != model.digest:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"state token is for another version of model {model.name!r} "
                          "(bundle digest differs)")
        want = [a.shape for a in model.runtime.init_state(1)]
        if [a.shape for a in snapshot.state] != want or (
                snapshot.logits is not None and snapshot.logits.shape != (model.runtime.vocab_size,)):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "state token arrays do not fit the model")
        session = self.sessions.create(model.name, snapshot.state, snapshot.logits, snapshot.pending,
                                       snapshot.tokens)
        return self.session_info(session)


class _Service:
    def __init__(self, app: App) -> None:
        self.app = app


class GenerationService(_Service, pb_grpc.GenerationServicer):
    @streaming
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        app = self.app
        model = app.model(request.model)
        max_tokens, params, stops = app.generation_options(request.max_tokens, request.sampling,
                                                           list(request.stop))
        ids = app.encode(model, request.prompt, "prompt")
        with app.stream_slot():
            stream = model.engine.submit(Request(ids, max_tokens, params, stops, request.logprobs))
            async for message in app.relay(model, stream):
                yield message

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        return pb.ListModelsResponse(models=[m.info for _, m in sorted(self.app.models.items())])

    @unary
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        return self.app.model(request.model).info


class SessionService(_Service, pb_grpc.SessionsServicer):
    @unary
    async def Open(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext):
        return await self.app.open_session(request.model, request.prompt)

    @unary
    async def Append(self, request: pb.AppendRequest, context: grpc.aio.ServicerContext):
        return await self.app.append(request.session_id, request.text)

    @streaming
    async def Generate(self, request: pb.SessionGenerateRequest, context: grpc.aio.ServicerContext):
        async for message in self.app.session_generate(request, request.session_id):
            yield message

    @unary
    async def Close(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext):
        self.app.sessions.close(request.session_id)
        return pb.CloseSessionResponse()

    @unary
    async def Export(self, request: pb.ExportSessionRequest, context: grpc.aio.ServicerContext):
        return self.app.export_session(request.session_id)

    @unary
    async def Resume(self, request: pb.ResumeSessionRequest, context: grpc.aio.ServicerContext):
        return self.app.resume_session(request.token)

    @streaming
    async def Interact(self, request_iterator: AsyncIterator[pb.InteractRequest],
                       context: grpc.aio.ServicerContext):
        app, session_id, owned = self.app, None, False
        try:
            async for request in request_iterator:
                action = request.WhichOneof("action")
                if session_id is None:
                    if action == "open":
                        info = await app.open_session(request.open.model, request.open.prompt)
                    elif action == "resume_token":
                        info = app.resume_session(request.resume_token)
                    elif action == "attach_session_id":
                        session, _ = app.acquire(request.attach_session_id)
                        app.sessions.release(session)
                        info = app.session_info(session)
                    else:
                        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                      "the first message must open, attach or resume a session")
                    session_id = info.session_id
                    owned = action != "attach_session_id" and not request.keep_open
                    yield pb.InteractResponse(session=info)
                elif action == "append":
                    yield pb.InteractResponse(session=await app.append(session_id, request.append))
                elif action == "generate":
                    async for message in app.session_generate(request.generate, session_id):
                        yield pb.InteractResponse(generation=message)
                elif action == "export":
                    yield pb.InteractResponse(state=app.export_session(session_id))
                else:
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{action or 'an empty message'} is only allowed as the first message")
        finally:
            if owned:
                with contextlib.suppress(SessionNotFound):
                    app.sessions.close(session_id)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata on every call except health checks."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]

    def _allowed(self, metadata: tuple) -> bool:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
            return False
        offered = values[0][len("Bearer "):].encode("utf-8")
        return any(hmac.compare_digest(offered, token) for token in self._tokens)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/") or self._allowed(
                handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            yield  # an async generator, as streaming handlers are

        kind = (handler.request_streaming, handler.response_streaming)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        behaviour = deny_stream if handler.response_streaming else deny
        return make[kind](behaviour, request_deserializer=handler.request_deserializer,
                          response_serializer=handler.response_serializer)


def _add_translation(server: grpc.aio.Server, bundles: list[Path], config: ServerConfig,
                     registry: object = None) -> list[str]:
    """Hands seq2seq bundles to serving.translation_service; -> its service names."""
    if not bundles:
        return []
    from serving import translation_service  # imported only when a translator is served

    return list(translation_service.add_to_server(server, bundles, config, registry))  # app metrics registry


class RnnlabServer:
    """A running server: ``await start()``, then ``port``; ``await stop(grace)`` drains and ends it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        runtimes, self._translators = load_runtimes(config.models, config.ort_threads)
        self.app = App(config, runtimes)
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> int:
        config = self.config
        tokens = config.bearer_tokens()
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        server = grpc.aio.server(interceptors=[BearerAuth(tokens)] if tokens else [], options=options)
        pb_grpc.add_GenerationServicer_to_server(GenerationService(self.app), server)
        pb_grpc.add_SessionsServicer_to_server(SessionService(self.app), server)
        services = [*GENERATION_SERVICES, *_add_translation(server, self._translators, config,
                                                                   self.app.metrics.registry)]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert:
                credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                            Path(config.tls_cert).read_bytes())])
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc.aio raises it when the address cannot be bound
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if self.port == 0:
            raise ConfigError(f"cannot listen on {address}")
        self.app.start(asyncio.get_running_loop())
        await server.start()
        self._server = server
        for name in ["", *services]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self.metrics_port = self.app.metrics.serve_http(config.metrics_port, config.host)
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("listening on %s:%d (%d models)%s", config.host, self.port, len(self.app.models),
                 f", metrics on :{self.metrics_port}" if self.metrics_port is not None else "")
        return self.port

    async def _sweep(self) -> None:
        period = max(0.5, min(30.0, self.config.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self.app.sessions.expire()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let calls in flight finish for ``grace`` seconds."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._server.stop(self.config.grace_s if grace is None else grace)
        self._server = None
        await asyncio.get_running_loop().run_in_executor(None, self.app.stop)
        self.app.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class ServerThread:
    """A server on an event loop of a background thread (tests, benchmarks): ``with ServerThread(cfg):``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: RnnlabServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rnnlab-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def app(self) -> App:
        return self.server.app

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = RnnlabServer(self.config)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def call(self, coroutine, timeout: float = 60):
        """Runs a coroutine on the server's loop (state the store only touches from there)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlab-serve", description="Serve rnnlab bundles over gRPC.")
    parser.add_argument("--models", help="directory of bundles (or one bundle directory)")
    parser.add_argument("--port", type=int, help="gRPC port (0: a free one, printed on stdout)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--config", help="server.toml with any ServerConfig setting")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: a free one)")
    parser.add_argument("--no-batching", dest="batching", action="store_const", const=False,
                        help="one stream per ORT call (comparison runs)")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--max-streams", type=int)
    parser.add_argument("--max-sessions", type=int)
    parser.add_argument("--prompt-cache-entries", type=int, help="prompt states cached per model (0: off)")
    parser.add_argument("--translate-workers", type=int,
                        help="translation batches searched at once per translator (default 2; 1 on one core)")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--grace", dest="grace_s", type=float, help="SIGTERM drain grace period in seconds")
    parser.add_argument("--log-level")
    return parser


async def _serve(config: ServerConfig) -> None:
    server = RnnlabServer(config)
    port = await server.start()
    print(f"rnnlab-serve listening on {config.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    draining = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, draining.set)
    await draining.wait()
    log.info("draining: refusing new calls, %.1f s for calls in flight", config.grace_s)
    await server.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    return run_command(lambda: _serve_from(load_config(args.config, **overrides)))


def _serve_from(config: ServerConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
