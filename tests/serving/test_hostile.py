"""Hostile requests for every RPC of every service (issues 18 and 19), against one real server on 127.0.0.1
serving a language model and a translator: each row of the table gets its status, then a health check and
a normal call must still succeed. ``test_every_rpc_has_rows`` makes a new RPC ship with its rows.

Raw-bytes rows go through a generic ``channel.unary_unary`` / ``stream_stream`` with identity
serialisers, as a client in another language with a broken encoder would send them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import state_token
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.api.rnnlab.v1 import translation_pb2_grpc as tpb_grpc
from serving.harness import ServerThread
from tests.committed_bundles import TRANSLATOR, committed
from tests.serving.serve_helpers import STATE_KEY, Stubs, config

Code = grpc.StatusCode
PROMPT = "The Time"
MT = TRANSLATOR
GARBAGE = b"\xff" * 11  # a varint longer than 10 bytes: corrupt for every message type
KEY = STATE_KEY.encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("hostile")
    for name in ("tiny", MT):
        shutil.copytree(committed(name), models / name)
    with ServerThread(config(models, max_tokens=100_000)) as running:
        yield running


class Ctx:
    """What a row's call gets: typed stubs, the raw channel, and a session opened for the row."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.stubs = Stubs(server.port)
        self.channel = self.stubs.channel
        self.translation = tpb_grpc.TranslationStub(self.channel)

    def raw(self, method: str, data: bytes, timeout: float = 10) -> object:
        """Sends ``data`` as the request of ``method`` ("Service/Method") with identity serialisers."""
        service, name = method.split("/")
        descriptor = _METHODS[method]
        path = f"/rnnlab.v1.{service}/{name}"
        if descriptor.client_streaming:
            call = self.channel.stream_stream(path)(iter([data]), timeout=timeout)
            return list(call)
        if descriptor.server_streaming:
            return list(self.channel.unary_stream(path)(data, timeout=timeout))
        return self.channel.unary_unary(path)(data, timeout=timeout)

    def session(self, prompt: str = PROMPT) -> str:
        return self.stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=prompt)).session_id

    def token(self) -> bytes:
        session = self.session()
        return self.stubs.sessions.Export(pb.ExportSessionRequest(session_id=session)).token


def _all_methods() -> dict[str, object]:
    methods = {}
    for file in (pb.DESCRIPTOR, tpb.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                methods[f"{service.name}/{method.name}"] = method
    return methods


_METHODS = _all_methods()


@dataclass
class Row:
    rpc: str
    case: str
    call: Callable[[Ctx], object]
    code: grpc.StatusCode


def forged(ctx: Ctx, **header: object) -> bytes:
    """A token of a real session with header fields replaced, re-signed with the server's (test) key."""
    snapshot = state_token.decode(ctx.token(), KEY)
    for field, value in header.items():
        setattr(snapshot, field, value)
    return _resign(state_token.encode(snapshot, KEY), **header)


def _resign(token: bytes, **header: object) -> bytes:
    """Rewrites header fields that ``encode`` cannot carry (wrong types, ids beyond 64 bits), re-signed."""
    body = token[: -state_token._TAG]
    start = len(state_token.MAGIC) + 5
    end = start + int.from_bytes(body[len(state_token.MAGIC) + 1 : start], "big")
    data = json.loads(body[start:end])
    data.update(header)
    head = json.dumps(data).encode()
    rebuilt = body[: len(state_token.MAGIC) + 1] + len(head).to_bytes(4, "big") + head + body[end:]
    return rebuilt + hmac.new(KEY, rebuilt, hashlib.sha256).digest()


def bomb(ctx: Ctx) -> bytes:
    """A signed token whose zlib payload inflates to 256 MB while its shapes claim a few hundred bytes."""
    token = ctx.token()
    body = token[: -state_token._TAG]
    start = len(state_token.MAGIC) + 5
    end = start + int.from_bytes(body[len(state_token.MAGIC) + 1 : start], "big")
    rebuilt = body[:end] + zlib.compress(b"\0" * (256 << 20), 9)
    return rebuilt + hmac.new(KEY, rebuilt, hashlib.sha256).digest()


def nan_state(ctx: Ctx) -> bytes:
    snapshot = state_token.decode(ctx.token(), KEY)
    snapshot.state = [np.full_like(a, np.nan) for a in snapshot.state]
    return state_token.encode(snapshot, KEY)


def resume(token: Callable[[Ctx], bytes]) -> Callable[[Ctx], object]:
    return lambda ctx: ctx.stubs.sessions.Resume(pb.ResumeSessionRequest(token=token(ctx)))


def generate(**fields: object) -> Callable[[Ctx], object]:
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, **fields}
    return lambda ctx: list(ctx.stubs.generation.Generate(pb.GenerateRequest(**request)))


def session_generate(**fields: object) -> Callable[[Ctx], object]:
    def call(ctx: Ctx) -> object:
        request = pb.SessionGenerateRequest(session_id=ctx.session(), max_tokens=3, **fields)
        return list(ctx.stubs.sessions.Generate(request))

    return call


def translate(sentences: list[str] | None = None, model: str = MT, **options: object) -> Callable:
    request = tpb.TranslateRequest(
        model=model, sentences=sentences or ["Hello."], options=tpb.TranslateOptions(**options)
    )
    return lambda ctx: ctx.translation.Translate(request, timeout=30)


def stream_translate(*messages: tpb.TranslateStreamRequest) -> Callable[[Ctx], object]:
    return lambda ctx: list(ctx.translation.TranslateStream(iter(messages), timeout=30))


def interact(*messages: Callable[[Ctx], pb.InteractRequest]) -> Callable[[Ctx], object]:
    return lambda ctx: list(ctx.stubs.sessions.Interact(iter([m(ctx) for m in messages]), timeout=30))


def busy_append(ctx: Ctx) -> object:
    """A second call on a session while a long generation holds it."""
    session = ctx.session()
    holding = ctx.stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=session, max_tokens=100_000))
    next(holding)
    try:
        return ctx.stubs.sessions.Append(pb.AppendRequest(session_id=session, text="x"))
    finally:
        holding.cancel()


def cancelled_after_first(ctx: Ctx) -> object:
    call = ctx.stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=100_000))
    next(call)
    call.cancel()
    return list(call)


def unread_then_cancelled(ctx: Ctx) -> object:
    """A stream the client never reads for a while (flow control holds the server back), then cancels."""
    call = ctx.stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=100_000))
    time.sleep(1.0)
    call.cancel()
    return list(call)


def first(request: pb.InteractRequest) -> Callable[[Ctx], pb.InteractRequest]:
    return lambda ctx: request


BIG = "x" * (1 << 20)
LONG_PROMPT = "a" * 40_000
ROWS = [
    # Generation
    Row(
        "Generation/Generate",
        "garbage bytes",
        lambda c: c.raw("Generation/Generate", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/Generate",
        "bad UTF-8 prompt",
        lambda c: c.raw("Generation/Generate", b"\x0a\x04tiny\x12\x02\xff\xfe"),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/Generate",
        "empty request",
        lambda c: list(c.stubs.generation.Generate(pb.GenerateRequest())),
        Code.NOT_FOUND,
    ),
    Row("Generation/Generate", "oversized prompt", generate(prompt=LONG_PROMPT), Code.INVALID_ARGUMENT),
    Row("Generation/Generate", "1 MB model name", generate(model=BIG), Code.NOT_FOUND),
    Row(
        "Generation/Generate",
        "NaN temperature",
        generate(sampling=pb.SamplingOptions(temperature=float("nan"))),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/Generate",
        "inf temperature",
        generate(sampling=pb.SamplingOptions(temperature=float("inf"))),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/Generate",
        "inf top_p",
        generate(sampling=pb.SamplingOptions(top_p=float("inf"))),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/Generate",
        "max_tokens out of range",
        generate(max_tokens=2**31 - 1),
        Code.INVALID_ARGUMENT,
    ),
    Row("Generation/Generate", "negative max_tokens", generate(max_tokens=-1), Code.INVALID_ARGUMENT),
    Row(
        "Generation/Generate",
        "1 ms deadline",
        lambda c: list(
            c.stubs.generation.Generate(
                pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=100_000), timeout=0.001
            )
        ),
        Code.DEADLINE_EXCEEDED,
    ),
    Row("Generation/Generate", "cancel", cancelled_after_first, Code.CANCELLED),
    Row("Generation/Generate", "unread stream", unread_then_cancelled, Code.CANCELLED),
    Row(
        "Generation/ListModels",
        "garbage bytes",
        lambda c: c.raw("Generation/ListModels", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/ListModels",
        "empty request",
        lambda c: c.stubs.generation.ListModels(pb.ListModelsRequest()),
        Code.OK,
    ),
    Row(
        "Generation/GetModel",
        "garbage bytes",
        lambda c: c.raw("Generation/GetModel", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/GetModel",
        "bad UTF-8 name",
        lambda c: c.raw("Generation/GetModel", b"\x0a\x02\xff\xfe"),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Generation/GetModel",
        "empty name",
        lambda c: c.stubs.generation.GetModel(pb.GetModelRequest()),
        Code.NOT_FOUND,
    ),
    Row(
        "Generation/GetModel",
        "1 MB name",
        lambda c: c.stubs.generation.GetModel(pb.GetModelRequest(model=BIG)),
        Code.NOT_FOUND,
    ),
    # Sessions
    Row("Sessions/Open", "garbage bytes", lambda c: c.raw("Sessions/Open", GARBAGE), Code.INVALID_ARGUMENT),
    Row(
        "Sessions/Open",
        "unknown model",
        lambda c: c.stubs.sessions.Open(pb.OpenSessionRequest(model="nope")),
        Code.NOT_FOUND,
    ),
    Row(
        "Sessions/Open",
        "oversized prompt",
        lambda c: c.stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=LONG_PROMPT)),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Append", "garbage bytes", lambda c: c.raw("Sessions/Append", GARBAGE), Code.INVALID_ARGUMENT
    ),
    Row(
        "Sessions/Append",
        "1 MB session id",
        lambda c: c.stubs.sessions.Append(pb.AppendRequest(session_id=BIG, text="x")),
        Code.NOT_FOUND,
    ),
    Row(
        "Sessions/Append",
        "empty text",
        lambda c: c.stubs.sessions.Append(pb.AppendRequest(session_id=c.session(), text="")),
        Code.INVALID_ARGUMENT,
    ),
    Row("Sessions/Append", "concurrent use of a session", busy_append, Code.ABORTED),
    Row(
        "Sessions/Generate",
        "garbage bytes",
        lambda c: c.raw("Sessions/Generate", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Generate",
        "unknown session",
        lambda c: list(c.stubs.sessions.Generate(pb.SessionGenerateRequest(session_id="nope"))),
        Code.NOT_FOUND,
    ),
    Row(
        "Sessions/Generate",
        "NaN temperature",
        session_generate(sampling=pb.SamplingOptions(temperature=float("nan"))),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Generate",
        "empty session",
        lambda c: list(c.stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=c.session("")))),
        Code.FAILED_PRECONDITION,
    ),
    Row(
        "Sessions/Generate",
        "1 ms deadline",
        lambda c: list(
            c.stubs.sessions.Generate(
                pb.SessionGenerateRequest(session_id=c.session(), max_tokens=100_000), timeout=0.001
            )
        ),
        Code.DEADLINE_EXCEEDED,
    ),
    Row(
        "Sessions/CloseSession",
        "garbage bytes",
        lambda c: c.raw("Sessions/CloseSession", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/CloseSession",
        "unknown session",
        lambda c: c.stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id="nope")),
        Code.NOT_FOUND,
    ),
    Row("Sessions/Close", "garbage bytes", lambda c: c.raw("Sessions/Close", GARBAGE), Code.INVALID_ARGUMENT),
    Row(
        "Sessions/Close",
        "1 MB session id",
        lambda c: c.stubs.sessions.Close(pb.CloseSessionRequest(session_id=BIG)),
        Code.NOT_FOUND,
    ),
    Row(
        "Sessions/Export", "garbage bytes", lambda c: c.raw("Sessions/Export", GARBAGE), Code.INVALID_ARGUMENT
    ),
    Row(
        "Sessions/Export",
        "unknown session",
        lambda c: c.stubs.sessions.Export(pb.ExportSessionRequest(session_id="nope")),
        Code.NOT_FOUND,
    ),
    Row(
        "Sessions/Resume", "garbage bytes", lambda c: c.raw("Sessions/Resume", GARBAGE), Code.INVALID_ARGUMENT
    ),
    Row("Sessions/Resume", "empty token", resume(lambda c: b""), Code.INVALID_ARGUMENT),
    Row("Sessions/Resume", "truncated token", resume(lambda c: c.token()[:-5]), Code.PERMISSION_DENIED),
    Row(
        "Sessions/Resume",
        "forged: pending id 1000000",
        resume(lambda c: forged(c, pending=1_000_000)),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Resume",
        "forged: pending id -5",
        resume(lambda c: forged(c, pending=-5)),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Resume",
        "forged: pending id a string",
        resume(lambda c: _resign(c.token(), pending="x")),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Resume",
        "forged: pending id wider than 64 bits",
        resume(lambda c: _resign(c.token(), pending=2**70)),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Resume",
        "forged: 2**70 tokens",
        resume(lambda c: _resign(c.token(), tokens=2**70)),
        Code.INVALID_ARGUMENT,
    ),
    Row("Sessions/Resume", "forged: decompression bomb", resume(bomb), Code.INVALID_ARGUMENT),
    Row("Sessions/Resume", "forged: NaN state", resume(nan_state), Code.INVALID_ARGUMENT),
    Row(
        "Sessions/Resume",
        "another key",
        resume(lambda c: state_token.encode(state_token.decode(c.token(), KEY), b"another key")),
        Code.PERMISSION_DENIED,
    ),
    Row(
        "Sessions/Resume",
        "replayed token (a new session each time)",
        lambda c: [c.stubs.sessions.Resume(pb.ResumeSessionRequest(token=t)) for t in [c.token()] * 2],
        Code.OK,
    ),
    Row(
        "Sessions/Interact",
        "garbage bytes",
        lambda c: c.raw("Sessions/Interact", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Interact",
        "empty first message",
        interact(first(pb.InteractRequest())),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Interact",
        "append first",
        interact(first(pb.InteractRequest(append="x"))),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Interact",
        "open twice",
        interact(
            first(pb.InteractRequest(open=pb.OpenSessionRequest(model="tiny"))),
            first(pb.InteractRequest(open=pb.OpenSessionRequest(model="tiny"))),
        ),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Sessions/Interact",
        "forged resume token",
        interact(lambda c: pb.InteractRequest(resume_token=forged(c, pending=1_000_000))),
        Code.INVALID_ARGUMENT,
    ),
    # Translation
    Row(
        "Translation/Translate",
        "garbage bytes",
        lambda c: c.raw("Translation/Translate", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/Translate",
        "bad UTF-8 sentence",
        lambda c: c.raw("Translation/Translate", b"\x0a\x07tiny-mt\x12\x02\xff\xfe"),
        Code.INVALID_ARGUMENT,
    ),
    Row("Translation/Translate", "unknown model", translate(model="nope"), Code.NOT_FOUND),
    Row("Translation/Translate", "1 MB model name", translate(model=BIG), Code.NOT_FOUND),
    Row("Translation/Translate", "beam 1000", translate(beam_size=1000), Code.INVALID_ARGUMENT),
    Row(
        "Translation/Translate",
        "NaN length ratio",
        translate(max_length_ratio=float("nan")),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/Translate",
        "inf length penalty",
        translate(length_penalty=float("inf")),
        Code.INVALID_ARGUMENT,
    ),
    Row("Translation/Translate", "too many sentences", translate([""] * 4097), Code.RESOURCE_EXHAUSTED),
    Row(
        "Translation/Translate",
        "1 ms deadline",
        lambda c: c.translation.Translate(
            tpb.TranslateRequest(model=MT, sentences=["Hello there."] * 200), timeout=0.001
        ),
        Code.DEADLINE_EXCEEDED,
    ),
    Row(
        "Translation/TranslateStream",
        "garbage bytes",
        lambda c: c.raw("Translation/TranslateStream", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/TranslateStream",
        "unknown model",
        stream_translate(tpb.TranslateStreamRequest(id="1", sentence="Hi.", model="nope")),
        Code.NOT_FOUND,
    ),
    Row(
        "Translation/TranslateStream",
        "beam 1000 on the second message",
        stream_translate(
            tpb.TranslateStreamRequest(id="1", sentence="Hi.", model=MT),
            tpb.TranslateStreamRequest(id="2", sentence="Hi.", options=tpb.TranslateOptions(beam_size=1000)),
        ),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/TranslateStream",
        "another model on the second message",
        stream_translate(
            tpb.TranslateStreamRequest(id="1", sentence="Hi.", model=MT),
            tpb.TranslateStreamRequest(id="2", sentence="Hi.", model="tiny"),
        ),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/ListTranslators",
        "garbage bytes",
        lambda c: c.raw("Translation/ListTranslators", GARBAGE),
        Code.INVALID_ARGUMENT,
    ),
    Row(
        "Translation/ListTranslators",
        "empty request",
        lambda c: c.translation.ListTranslators(tpb.ListTranslatorsRequest()),
        Code.OK,
    ),
]


def test_every_rpc_has_rows():
    """A new RPC cannot ship without its rows: raw garbage and at least one typed case."""
    for method in _METHODS:
        cases = [row.case for row in ROWS if row.rpc == method]
        assert "garbage bytes" in cases and len(cases) >= 2, f"{method} needs rows in ROWS"


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def assert_still_serving(ctx: Ctx) -> None:
    health = health_pb2_grpc.HealthStub(ctx.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    messages = list(
        ctx.stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=3))
    )
    assert messages[-1].end.generated_tokens == 3


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.rpc}: {row.case}" for row in ROWS])
def test_hostile_request_gets_its_status_and_the_server_keeps_serving(server, row):
    ctx = Ctx(server)
    code, details = status_of(lambda: row.call(ctx))
    assert code == row.code, details
    # No Python class names, no echo of a whole client value (status metadata stays far below 8 KB).
    assert "<class" not in details and "Error" not in details.split(":")[0] and len(details) < 400
    assert_still_serving(ctx)
    ctx.channel.close()


def test_malformed_protobuf_message_is_plain():
    with ServerThread(config(committed("tiny"))) as server:
        ctx = Ctx(server)
        code, details = status_of(lambda: ctx.raw("Generation/Generate", b"\x0a\x04tiny\x12\x02\xff\xfe"))
        assert code == Code.INVALID_ARGUMENT
        assert details == "request is not a valid rnnlab.v1.GenerateRequest: string field had bad UTF-8"
        ctx.channel.close()


def sample(server: ServerThread, name: str, labels: dict[str, str] | None = None) -> float:
    return server.app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def counted(server: ServerThread, labels: dict[str, str], expected: float) -> float:
    """The request counter once it reaches ``expected`` (the server counts as its handler ends, which
    may be just after the client has its answer), or its value after 5 s."""
    deadline = time.monotonic() + 5
    while (
        value := sample(server, "rnnlab_requests_total", labels)
    ) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_a_forged_token_fails_only_its_own_call_while_a_stream_of_the_model_completes(server):
    """Issue 19's worst case: a re-signed token with pending id 1000000 once failed every stream of the
    model. It is refused at Resume now; a concurrent stream of the same model ends with all its tokens."""
    ctx = Ctx(server)
    stream = ctx.stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=2000))
    next(stream)
    for _ in range(5):
        token = forged(ctx, pending=1_000_000)
        code, _ = status_of(lambda t=token: ctx.stubs.sessions.Resume(pb.ResumeSessionRequest(token=t)))
        assert code == Code.INVALID_ARGUMENT
    messages = list(stream)
    assert messages[-1].end.generated_tokens == 2000
    ctx.channel.close()


def test_the_engine_fails_only_the_request_with_an_id_out_of_range(server):
    """The guard behind the token checks: a bad id never enters the batch, so other rows go on."""
    from serving.engine import Request, RequestRejected

    ctx = Ctx(server)
    stream = ctx.stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=500))
    next(stream)
    engine = server.app.models["tiny"].engine
    vocab = engine.runtime.vocab_size

    async def submit(ids: list[int]) -> None:
        engine.submit(Request(ids, 3))

    for ids in ([vocab], [-1], [1, 2, 1_000_000]):
        with pytest.raises(RequestRejected, match="out of range"):
            server.call(submit(ids))
    assert list(stream)[-1].end.generated_tokens == 500
    ctx.channel.close()


def test_a_token_with_too_many_tokens_creates_no_session_and_is_counted_as_refused(server):
    ctx = Ctx(server)
    token = _resign(ctx.token(), tokens=2**70)
    sessions = sample(server, "rnnlab_sessions")
    labels = {"method": "SessionService.Resume", "code": "INVALID_ARGUMENT"}
    refused, ok = (
        sample(server, "rnnlab_requests_total", labels),
        sample(server, "rnnlab_requests_total", {**labels, "code": "OK"}),
    )
    for _ in range(3):
        code, _ = status_of(lambda t=token: ctx.stubs.sessions.Resume(pb.ResumeSessionRequest(token=t)))
        assert code == Code.INVALID_ARGUMENT
    assert sample(server, "rnnlab_sessions") == sessions
    assert counted(server, labels, refused + 3) == refused + 3
    assert sample(server, "rnnlab_requests_total", {**labels, "code": "OK"}) == ok
    ctx.channel.close()


def test_malformed_requests_of_every_service_are_counted_with_the_status_sent(server):
    ctx = Ctx(server)
    for method, label in (
        ("Generation/GetModel", "GenerationService.GetModel"),
        ("Sessions/Interact", "SessionService.Interact"),
        ("Translation/Translate", "TranslationService.Translate"),
        ("Translation/TranslateStream", "TranslationService.TranslateStream"),
    ):
        labels = {"method": label, "code": "INVALID_ARGUMENT"}
        before = sample(server, "rnnlab_requests_total", labels)
        assert status_of(lambda m=method: ctx.raw(m, GARBAGE))[0] == Code.INVALID_ARGUMENT
        assert counted(server, labels, before + 1) == before + 1
    ok = {"method": "TranslationService.Translate", "code": "OK"}
    before = sample(server, "rnnlab_requests_total", ok)
    translate()(ctx)
    assert counted(server, ok, before + 1) == before + 1
    ctx.channel.close()


def test_malformed_requests_are_logged_at_most_once_per_interval(server, caplog):
    ctx = Ctx(server)
    with caplog.at_level("WARNING", logger="rnnlab.serve"):
        for _ in range(30):
            status_of(lambda: ctx.raw("Generation/GetModel", GARBAGE))
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) <= 1 and not [r for r in caplog.records if r.levelname == "ERROR"]
    ctx.channel.close()


def test_errors_carry_reasons_retry_hints_and_fields(server):
    from serving.client import error_details

    ctx = Ctx(server)

    def details(call: Callable[[], object]):
        with pytest.raises(grpc.RpcError) as info:
            call()
        return error_details(info.value)

    unknown_model = details(lambda: ctx.stubs.generation.GetModel(pb.GetModelRequest(model="nope")))
    assert unknown_model.reason == "MODEL_NOT_FOUND" and unknown_model.retry_after_s is None
    unknown_session = details(lambda: ctx.stubs.sessions.Append(pb.AppendRequest(session_id="x", text="y")))
    assert unknown_session.reason == "SESSION_NOT_FOUND"
    bad = details(lambda: generate(sampling=pb.SamplingOptions(temperature=-1.0))(ctx))
    assert bad.reason == "INVALID_ARGUMENT" and bad.fields[0][0] == "sampling.temperature"
    options = details(lambda: translate(beam_size=1000, n_best=2000)(ctx))
    assert {field for field, _ in options.fields} == {"options.beam_size", "options.n_best"}
    assert details(lambda: ctx.raw("Generation/GetModel", GARBAGE)).reason == "MALFORMED_REQUEST"
    ctx.channel.close()


def test_streams_exhausted_says_when_to_retry():
    from serving.client import error_details

    with ServerThread(config(committed("tiny"), max_streams=1, max_tokens=100_000)) as busy:
        ctx = Ctx(busy)
        holding = ctx.stubs.generation.Generate(
            pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=100_000)
        )
        next(holding)
        with pytest.raises(grpc.RpcError) as info:
            generate()(ctx)
        found = error_details(info.value)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        assert found.reason == "STREAMS_EXHAUSTED" and found.retry_after_s == 1.0
        holding.cancel()
        ctx.channel.close()


def test_close_session_and_close_both_close_and_export_false_exports_nothing(server):
    ctx = Ctx(server)
    for close in (ctx.stubs.sessions.CloseSession, ctx.stubs.sessions.Close):
        session = ctx.session()
        close(pb.CloseSessionRequest(session_id=session))
        again = pb.CloseSessionRequest(session_id=session)
        assert status_of(lambda c=close, r=again: c(r))[0] == Code.NOT_FOUND
    replies = list(
        ctx.stubs.sessions.Interact(
            iter(
                [
                    pb.InteractRequest(open=pb.OpenSessionRequest(model="tiny", prompt=PROMPT)),
                    pb.InteractRequest(export=False),
                    pb.InteractRequest(export=True),
                ]
            )
        )
    )
    assert [r.WhichOneof("event") for r in replies] == ["session", "session", "state"]
    assert replies[1].session.tokens == len(PROMPT) and replies[2].state.token
    ctx.channel.close()


def test_a_prompt_at_the_documented_character_limit_is_accepted(server):
    """32,768 characters, the documented limit, once hit the 8,192-token limit of a character model."""
    ctx = Ctx(server)
    limit = server.config.max_prompt_chars
    assert generate(prompt="a" * limit, max_tokens=1)(ctx)[-1].end.prompt_tokens >= limit
    code, details = status_of(lambda: generate(prompt="a" * (limit + 1))(ctx))
    assert code == Code.INVALID_ARGUMENT and "characters" in details
    ctx.channel.close()


def test_auth_is_checked_before_parsing_and_before_unknown_methods(caplog):
    with ServerThread(config(committed("tiny"), auth_tokens=["s3cret"])) as guarded:
        ctx = Ctx(guarded)
        with caplog.at_level("WARNING", logger="rnnlab.serve"):
            assert status_of(lambda: ctx.raw("Generation/Generate", GARBAGE))[0] == Code.UNAUTHENTICATED
            assert status_of(lambda: ctx.raw("Sessions/Interact", GARBAGE))[0] == Code.UNAUTHENTICATED
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
        unknown = ctx.channel.unary_unary("/rnnlab.v1.Generation/NoSuchMethod")
        assert status_of(lambda: unknown(b""))[0] == Code.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret"),)
        assert status_of(lambda: unknown(b"", metadata=good))[0] == Code.UNIMPLEMENTED
        for scheme in ("bearer", "BEARER", "Bearer"):
            metadata = (("authorization", f"{scheme} s3cret"),)
            assert ctx.stubs.generation.ListModels(pb.ListModelsRequest(), metadata=metadata).models
        health = health_pb2_grpc.HealthStub(ctx.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        ctx.channel.close()


def test_draining_answers_not_serving_ends_watches_and_lets_calls_in_flight_finish():
    running = ServerThread(config(committed("tiny"), max_tokens=100_000, grace_s=30.0)).__enter__()
    ctx = Ctx(running)
    health = health_pb2_grpc.HealthStub(ctx.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    long_call = ctx.stubs.generation.Generate(
        pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=3000)
    )
    next(long_call)
    started = time.monotonic()
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 30.0})
    stopper.start()
    statuses = [m.status for m in watch]  # the watch ends at the start of the drain, not after the grace
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() - started < 10
    check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status_of(lambda: generate()(ctx))[0] == Code.UNAVAILABLE
    assert list(long_call)[-1].end.generated_tokens == 3000
    stopper.join(30)
    assert not stopper.is_alive()
    ctx.channel.close()
