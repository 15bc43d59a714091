"""What the generation and session services share: models, engines, the session store, limits, metrics.

The servicers (serving.generation_service, serving.session_service) are thin: they call these methods,
which validate a request completely before anything reaches an engine or the session store, and raise
(serving.status maps the exceptions to status codes in the server's interceptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving import state_token
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.config import ServerConfig
from serving.engine import Finish, ModelEngine, Request, Stream
from serving.errors import quote
from serving.metrics import ServerMetrics
from serving.prompt_cache import PromptCache
from serving.registry import LoadedBundle
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from serving.sessions import Session, SessionNotFound, SessionStore, StoreLimits
from serving.status import Code, Refusal, invalid

log = logging.getLogger("rnnlab.serve")

_FINISH = {
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.STOP: pb.FINISH_REASON_STOP,
    Finish.EOS: pb.FINISH_REASON_EOS,
}


@dataclass
class Model:
    name: str
    runtime: LMRuntime
    engine: ModelEngine
    digest: str
    info: pb.ModelInfo


def model_info(runtime: LMRuntime, digest: str) -> pb.ModelInfo:
    manifest, arch = runtime.manifest, runtime.manifest.architecture
    return pb.ModelInfo(
        name=manifest.name,
        kind=manifest.kind,
        cell=str(arch.get("cell", "")),
        layers=runtime.layers,
        hidden_size=runtime.hidden,
        embedding_size=int(arch.get("embed", 0)),
        vocab_size=runtime.vocab_size,
        tokenizer=runtime.tokenizer.kind,
        bundle_digest=digest,
        evaluation=manifest.evaluation_numbers(),
        architecture_json=json.dumps(arch, sort_keys=True),
        state_bytes=sum(a.nbytes for a in runtime.init_state(1)),
    )


class App:
    """Models, engines, the session store, limits and metrics shared by the services."""

    def __init__(
        self, config: ServerConfig, bundles: dict[str, LoadedBundle], metrics: ServerMetrics
    ) -> None:
        """``bundles``: the registry's language-model bundles by served name."""
        self.config = config
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        for name, bundle in bundles.items():
            runtime, digest = bundle.runtime, bundle.digest
            engine = ModelEngine(
                name,
                runtime,
                self.metrics.for_model(name),
                config.batch_limit,
                config.prefill_chunk,
                config.flush_ms / 1000,
                config.max_messages_per_s,
                PromptCache(config.prompt_cache_entries, config.prompt_cache_bytes),
            )
            self.models[name] = Model(name, runtime, engine, digest, model_info(runtime, digest))
        self.sessions = SessionStore(
            StoreLimits(
                config.max_sessions,
                config.max_session_bytes,
                config.session_ttl_s,
                config.evict_idle_sessions,
            )
        )
        key = state_token.resolve_key(config.state_key, config.state_key_file)
        if key is None:
            log.warning(
                "no state key configured (--state-key-file / state_key / $%s): state tokens are valid "
                "on this process only",
                state_token.KEY_ENV,
            )
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
            raise Refusal(
                Code.NOT_FOUND,
                f"no model {quote(name)} (serving: {', '.join(sorted(self.models)) or 'none'})",
                "MODEL_NOT_FOUND",
            )
        return model

    def encode(self, model: Model, text: str, what: str, allow_empty: bool = False) -> list[int]:
        if not text and not allow_empty:
            raise invalid(what, f"{what} is empty")
        if len(text) > self.config.max_prompt_chars:
            raise invalid(
                what, f"{what} has {len(text)} characters, over the limit of {self.config.max_prompt_chars}"
            )
        ids = model.runtime.encode(text) if text else []
        if len(ids) > self.config.max_prompt_tokens:
            raise invalid(
                what, f"{what} has {len(ids)} tokens, over the limit of {self.config.max_prompt_tokens}"
            )
        return ids

    def generation_options(
        self, max_tokens: int, sampling: pb.SamplingOptions, stop: list[str]
    ) -> tuple[int, SamplingParams, tuple[str, ...]]:
        cap = self.config.max_tokens
        if max_tokens < 0 or max_tokens > cap:
            raise invalid("max_tokens", f"max_tokens must be in 0..{cap}, not {max_tokens}")
        top_p = sampling.top_p if sampling.top_p != 0 else 1.0
        if math.isnan(top_p):
            raise invalid("sampling.top_p", "top_p must be in (0, 1], not nan")
        try:
            params = SamplingParams(
                float(sampling.temperature),
                int(sampling.top_k),
                float(top_p),
                sampling.seed if sampling.HasField("seed") else None,
            )
        except ValueError as exc:
            raise invalid(f"sampling.{str(exc).split()[0]}", str(exc)) from None
        stops = tuple(s for s in stop if s)
        limit, chars = self.config.max_stop_strings, self.config.max_stop_chars
        if len(stops) > limit or any(len(s) > chars for s in stops):
            raise invalid("stop", f"at most {limit} stop strings of at most {chars} characters")
        return max_tokens or self.config.default_max_tokens, params, stops

    @contextlib.contextmanager
    def stream_slot(self):
        if self.active_streams >= self.config.max_streams:
            raise Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"server busy: {self.active_streams} streams running (limit {self.config.max_streams})",
                "STREAMS_EXHAUSTED",
                retry_s=1.0,
            )
        self.active_streams += 1
        try:
            yield
        finally:
            self.active_streams -= 1

    # -- running requests ---------------------------------------------------------------------------

    async def relay(
        self,
        model: Model,
        stream: Stream,
        session_tokens: int | None = None,
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
                    raise stream.error
                message = pb.GenerateResponse(text=text, token_ids=ids, logprobs=logprobs)
                outcome = stream.outcome
                if outcome is not None:
                    total = 0 if session_tokens is None else session_tokens + outcome.generated_tokens
                    message.end.CopyFrom(
                        pb.GenerationEnd(
                            finish_reason=_FINISH[outcome.finish],
                            prompt_tokens=outcome.prompt_tokens,
                            generated_tokens=outcome.generated_tokens,
                            session_tokens=total,
                        )
                    )
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
            raise stream.error
        return stream

    # -- sessions -----------------------------------------------------------------------------------

    def session_info(self, session: Session, appended: int = 0) -> pb.SessionInfo:
        return pb.SessionInfo(
            session_id=session.id,
            model=session.model,
            tokens=session.tokens,
            appended_tokens=appended,
            idle_ttl_seconds=self.config.session_ttl_s,
        )

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

    def describe(self, session_id: str) -> pb.SessionInfo:
        """The session's info; NOT_FOUND / ABORTED (busy) as for any call on it."""
        session, _ = self.acquire(session_id)
        self.sessions.release(session)
        return self.session_info(session)

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

    async def session_generate(
        self,
        request: pb.SessionGenerateRequest,
        session_id: str,
    ) -> AsyncIterator[pb.GenerateResponse]:
        session, model = self.acquire(session_id)
        try:
            ids = self.encode(model, request.text, "text", allow_empty=True)
            max_tokens, params, stops = self.generation_options(
                request.max_tokens, request.sampling, list(request.stop)
            )
            feed = [session.pending, *ids] if session.pending is not None else ids
            if not feed and session.logits is None:
                raise Refusal(
                    Code.FAILED_PRECONDITION,
                    "the session holds no text yet: append text or pass it with the call",
                    "SESSION_EMPTY",
                )
            with self.stream_slot():
                stream = model.engine.submit(
                    Request(
                        feed,
                        max_tokens,
                        params,
                        stops,
                        request.logprobs,
                        session.state,
                        None if feed else session.logits,
                    )
                )
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
            snapshot = state_token.SessionState(
                model.name, model.digest, session.state, session.logits, session.pending, session.tokens
            )
            return pb.StateToken(
                token=state_token.encode(snapshot, self.state_key), model=model.name, tokens=session.tokens
            )
        finally:
            self.sessions.release(session)

    def resume_session(self, token: bytes) -> pb.SessionInfo:
        """A new session from a state token, created only once every field fits the model."""
        snapshot = state_token.decode(token, self.state_key)
        model = self.model(snapshot.model)
        if snapshot.bundle_digest != model.digest:
            raise Refusal(
                Code.FAILED_PRECONDITION,
                f"state token is for another version of model {model.name!r} (bundle digest differs)",
                "TOKEN_OTHER_VERSION",
            )
        vocab = model.runtime.vocab_size
        want = [a.shape for a in model.runtime.init_state(1)]
        if [a.shape for a in snapshot.state] != want or (
            snapshot.logits is not None and snapshot.logits.shape != (vocab,)
        ):
            raise Refusal(Code.INVALID_ARGUMENT, "state token arrays do not fit the model", "TOKEN_MALFORMED")
        if snapshot.pending is not None and not 0 <= snapshot.pending < vocab:
            raise Refusal(
                Code.INVALID_ARGUMENT,
                f"state token's pending id {snapshot.pending} is not in [0, {vocab})",
                "TOKEN_MALFORMED",
            )
        session = self.sessions.create(
            model.name, snapshot.state, snapshot.logits, snapshot.pending, snapshot.tokens
        )
        return self.session_info(session)
