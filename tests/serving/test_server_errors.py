"""Every bad call gets its status code while the server keeps serving; limits, auth, health, reflection."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import state_token
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client
from serving.harness import ServerThread
from tests.serving.serve_helpers import STATE_KEY, Stubs, config

Code = grpc.StatusCode
PROMPT = "The Time"


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value.code()


def assert_still_serving(stubs: Stubs) -> None:
    messages = list(stubs.generation.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=3)))
    assert messages[-1].end.generated_tokens == 3


def sampling(**fields) -> pb.SamplingOptions:
    return pb.SamplingOptions(**fields)


BAD_GENERATIONS = {
    "unknown model": (dict(model="nope"), Code.NOT_FOUND),
    "empty prompt": (dict(prompt=""), Code.INVALID_ARGUMENT),
    "oversized prompt": (dict(prompt="a" * 40_000), Code.INVALID_ARGUMENT),
    "negative temperature": (dict(sampling=sampling(temperature=-0.5)), Code.INVALID_ARGUMENT),
    "nan temperature": (dict(sampling=sampling(temperature=float("nan"))), Code.INVALID_ARGUMENT),
    "top_p above 1": (dict(sampling=sampling(top_p=1.5)), Code.INVALID_ARGUMENT),
    "negative top_p": (dict(sampling=sampling(top_p=-0.1)), Code.INVALID_ARGUMENT),
    "nan top_p": (dict(sampling=sampling(top_p=float("nan"))), Code.INVALID_ARGUMENT),
    "negative top_k": (dict(sampling=sampling(top_k=-1)), Code.INVALID_ARGUMENT),
    "max_tokens over the cap": (dict(max_tokens=100_001), Code.INVALID_ARGUMENT),
    "negative max_tokens": (dict(max_tokens=-1), Code.INVALID_ARGUMENT),
    "too many stop strings": (dict(stop=[str(i) for i in range(9)]), Code.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("name", list(BAD_GENERATIONS))
def test_bad_generation_gets_its_status_and_the_server_keeps_serving(stubs, name):
    fields, code = BAD_GENERATIONS[name]
    request = pb.GenerateRequest(**{"model": "tiny", "prompt": PROMPT, "max_tokens": 5, **fields})
    assert status_of(lambda: stubs.generation.Generate(request)) == code
    assert_still_serving(stubs)


def test_session_errors(stubs):
    s = stubs.sessions
    assert status_of(lambda: s.Append(pb.AppendRequest(session_id="nope", text="x"))) == Code.NOT_FOUND
    assert status_of(lambda: s.Close(pb.CloseSessionRequest(session_id="nope"))) == Code.NOT_FOUND
    assert status_of(lambda: s.Open(pb.OpenSessionRequest(model="nope"))) == Code.NOT_FOUND
    empty = s.Open(pb.OpenSessionRequest(model="tiny"))
    assert (
        status_of(lambda: s.Generate(pb.SessionGenerateRequest(session_id=empty.session_id)))
        == Code.FAILED_PRECONDITION
    )
    assert (
        status_of(lambda: s.Append(pb.AppendRequest(session_id=empty.session_id, text="")))
        == Code.INVALID_ARGUMENT
    )
    s.Close(pb.CloseSessionRequest(session_id=empty.session_id))
    assert status_of(lambda: s.Close(pb.CloseSessionRequest(session_id=empty.session_id))) == Code.NOT_FOUND
    assert_still_serving(stubs)


def test_a_busy_session_refuses_a_second_call(stubs):
    info = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
    call = stubs.sessions.Generate(pb.SessionGenerateRequest(session_id=info.session_id, max_tokens=100_000))
    next(call)
    assert (
        status_of(lambda: stubs.sessions.Append(pb.AppendRequest(session_id=info.session_id, text="x")))
        == Code.ABORTED
    )
    call.cancel()
    # A cancelled call leaves the session usable (as it was before the call).
    deadline = time.monotonic() + 5
    while True:
        try:
            stubs.sessions.Append(pb.AppendRequest(session_id=info.session_id, text="x"))
            break
        except grpc.RpcError as exc:
            assert exc.code() == Code.ABORTED and time.monotonic() < deadline


def test_state_tokens_that_are_tampered_foreign_or_malformed_are_refused(stubs, server):
    info = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
    token = stubs.sessions.Export(pb.ExportSessionRequest(session_id=info.session_id)).token

    def resume(data: bytes) -> grpc.StatusCode:
        return status_of(lambda: stubs.sessions.Resume(pb.ResumeSessionRequest(token=data)))

    tampered = bytearray(token)
    tampered[len(tampered) // 2] ^= 1
    assert resume(bytes(tampered)) == Code.PERMISSION_DENIED
    snapshot = state_token.decode(token, STATE_KEY.encode())
    assert resume(state_token.encode(snapshot, b"another key")) == Code.PERMISSION_DENIED
    snapshot.bundle_digest = "0" * 64  # signed with the right key, but for other weights
    assert resume(state_token.encode(snapshot, STATE_KEY.encode())) == Code.FAILED_PRECONDITION
    snapshot.model = "gone"
    assert resume(state_token.encode(snapshot, STATE_KEY.encode())) == Code.NOT_FOUND
    assert resume(b"not a token at all, not at all, not at all, no") == Code.INVALID_ARGUMENT
    assert_still_serving(stubs)


def test_cancelling_a_stream_frees_its_slot_at_once(models_dir):
    with ServerThread(config(models_dir, max_streams=1, max_tokens=1_000_000)) as server:
        stubs = Stubs(server.port)
        long_request = pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=1_000_000)
        call = stubs.generation.Generate(long_request)
        next(call)
        assert server.app.active_streams == 1
        assert (
            status_of(
                lambda: stubs.generation.Generate(
                    pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=3)
                )
            )
            == Code.RESOURCE_EXHAUSTED
        )
        call.cancel()
        deadline = time.monotonic() + 2
        while server.app.active_streams and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.app.active_streams == 0
        engine = server.app.models["tiny"].engine
        while engine._batch and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not engine._batch  # out of the decode batch, not generating a million tokens
        assert_still_serving(stubs)
        stubs.channel.close()


def test_a_passed_deadline_is_deadline_exceeded_and_frees_the_slot(models_dir):
    with ServerThread(config(models_dir, max_streams=1, max_tokens=1_000_000)) as server:
        stubs = Stubs(server.port)
        request = pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=1_000_000)
        assert status_of(lambda: stubs.generation.Generate(request, timeout=0.3)) == Code.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 2
        while server.app.active_streams and time.monotonic() < deadline:
            time.sleep(0.005)
        assert_still_serving(stubs)
        stubs.channel.close()


def test_session_limits_expiry_and_refusal_when_full(models_dir):
    with ServerThread(
        config(models_dir, max_sessions=2, evict_idle_sessions=False, session_ttl_s=0.3)
    ) as server:
        stubs = Stubs(server.port)
        first = stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
        stubs.sessions.Open(pb.OpenSessionRequest(model="tiny"))
        assert (
            status_of(lambda: stubs.sessions.Open(pb.OpenSessionRequest(model="tiny")))
            == Code.RESOURCE_EXHAUSTED
        )
        time.sleep(0.4)  # both idle past the TTL: expired, their room is free again
        assert (
            status_of(lambda: stubs.sessions.Append(pb.AppendRequest(session_id=first.session_id, text="x")))
            == Code.NOT_FOUND
        )
        stubs.sessions.Open(pb.OpenSessionRequest(model="tiny"))
        assert len(server.app.sessions) == 1
        stubs.channel.close()


def test_bearer_token_is_required_except_for_health(models_dir):
    with ServerThread(config(models_dir, auth_tokens=["s3cret"])) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stubs = Stubs(server.port)
        request = pb.ListModelsRequest()
        assert status_of(lambda: stubs.generation.ListModels(request)) == Code.UNAUTHENTICATED
        wrong = (("authorization", "Bearer nope"),)
        assert status_of(lambda: stubs.generation.ListModels(request, metadata=wrong)) == Code.UNAUTHENTICATED
        stream = pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=2)
        assert status_of(lambda: stubs.generation.Generate(stream)) == Code.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret"),)
        assert len(stubs.generation.ListModels(request, metadata=good).models) == 2
        assert len(list(stubs.generation.Generate(stream, metadata=good))) >= 1
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        stubs.channel.close()


def test_health_reflection_and_metrics_answer(models_dir):
    with ServerThread(config(models_dir, metrics_port=0)) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnlab.v1.Generation", "rnnlab.v1.Sessions"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(replies).list_services_response.service}
        assert {"rnnlab.v1.Generation", "rnnlab.v1.Sessions", "grpc.health.v1.Health"} <= names
        assert_still_serving(Stubs(server.port))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'rnnlab_generated_tokens_total{model="tiny"} 3.0' in body
        assert "rnnlab_time_to_first_token_seconds_count" in body
        assert (
            'rnnlab_requests_total{code="OK",method="GenerationService.Generate"} 1.0' in body
            or 'rnnlab_requests_total{method="GenerationService.Generate",code="OK"} 1.0' in body
        )
        channel.close()


def test_a_bad_bundle_is_refused_while_the_good_ones_serve(models_dir, tmp_path, caplog):
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    with (models / "tiny-lstm" / "model.onnx").open("r+b") as graph:
        graph.seek(100)
        graph.write(b"\x00\x01\x02")
    with caplog.at_level("WARNING"), ServerThread(config(models)) as server:
        stubs = Stubs(server.port)
        assert [m.name for m in stubs.generation.ListModels(pb.ListModelsRequest()).models] == ["tiny"]
        assert (
            status_of(lambda: stubs.generation.GetModel(pb.GetModelRequest(model="tiny-lstm")))
            == Code.NOT_FOUND
        )
        assert_still_serving(stubs)
        stubs.channel.close()
    assert any(
        "refusing bundle tiny-lstm" in r.getMessage() and "model.onnx" in r.getMessage()
        for r in caplog.records
    )


def test_tls_serves_clients_that_trust_the_certificate(models_dir, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    with ServerThread(config(models_dir, tls_cert=str(cert), tls_key=str(key))) as server:
        with Client(f"127.0.0.1:{server.port}", tls_ca=cert, timeout=10) as client:
            assert "".join(client.generate_text("tiny", PROMPT, 5)) != ""
        with Client(f"127.0.0.1:{server.port}", timeout=2) as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                plaintext.models()
            assert refused.value.code() == Code.UNAVAILABLE


def test_an_unexpected_exception_is_internal_counted_as_internal_and_the_server_keeps_serving(
    models_dir, monkeypatch
):
    """A bug inside a handler (injected here) reaches the client as a plain INTERNAL, never as OK or
    UNKNOWN, and rnnlab_requests counts what the client received."""
    with ServerThread(config(models_dir)) as server:
        stubs = Stubs(server.port)

        async def broken(model: str, prompt: str):
            raise RuntimeError("injected fault")

        monkeypatch.setattr(server.app, "open_session", broken)
        with pytest.raises(grpc.RpcError) as info:
            stubs.sessions.Open(pb.OpenSessionRequest(model="tiny", prompt=PROMPT))
        assert info.value.code() == Code.INTERNAL and "injected" not in info.value.details()
        registry = server.app.metrics.registry
        labels = {"method": "SessionService.Open"}
        deadline = time.monotonic() + 5  # the server counts after the status has left
        while registry.get_sample_value("rnnlab_requests_total", {**labels, "code": "INTERNAL"}) is None:
            assert time.monotonic() < deadline, "the failed call was never counted"
            time.sleep(0.01)
        assert registry.get_sample_value("rnnlab_requests_total", {**labels, "code": "INTERNAL"}) == 1
        assert registry.get_sample_value("rnnlab_requests_total", {**labels, "code": "OK"}) is None
        assert_still_serving(stubs)
        stubs.channel.close()
