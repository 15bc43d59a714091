"""rnnlab-serve replicas behind nginx (``grpc_pass``), configured by deploy/nginx/nginx.conf used as it is.

What nginx does, as measured here: it spreads calls over the replicas; a replica that refuses connections
(stopped, killed) is skipped without the client noticing; a replica killed mid-stream ends that stream
with INTERNAL (nginx resets the client's stream: RST_STREAM INTERNAL_ERROR), not UNAVAILABLE; a draining
replica's UNAVAILABLE [SERVER_DRAINING] answers reach the client (nginx OSS has no active health checks and
sees a gRPC error as an HTTP 200), until the replica has stopped.
"""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.client import Client, error_details
from tests.serving.replica_helpers import (
    LONG,
    PROMPT,
    calls,
    holder,
    key_file,
    killed_mid_generation,
    open_and_export,
    replica_process,
    resumed_tokens,
    start_nginx,
    thread_replicas,
)


@pytest.fixture
def replicas(tmp_path):
    with thread_replicas(tmp_path) as pair:
        yield pair


@pytest.fixture
def nginx(tmp_path, replicas):
    front = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{r.port}" for r in replicas])
    yield front
    front.stop()


def test_nginx_spreads_calls_over_both_replicas(replicas, nginx):
    a, b = replicas
    with Client(nginx.target) as client:
        for seed in range(20):
            assert list(client.generate("tiny", PROMPT, 8, temperature=1.0, seed=seed))[-1].end
    counts = calls((a, b), 20)
    assert sum(counts) == 20 and min(counts) >= 5


def test_a_state_token_resumes_on_whichever_replica_nginx_picks(replicas, nginx):
    """Through a balancer every call may land on another replica: a session lives in one Interact stream
    (one replica), and continues on another from its state token, with the same greedy tokens."""
    with Client(nginx.target) as client:
        interaction, _, token = open_and_export(client)
        stayed = [i for m in interaction.generation(150) for i in m.token_ids]
        interaction.close()
        for _ in range(8):
            assert resumed_tokens(client, token, [], "", 150) == stayed
    counts = calls(replicas, 9, "SessionService.Interact")
    assert sum(counts) == 9 and min(counts) >= 2


def test_a_replica_killed_behind_nginx_mid_stream_and_the_session_resumes(tmp_path):
    key = key_file(tmp_path)
    processes = {"a": replica_process(tmp_path, key), "b": replica_process(tmp_path, key)}
    front = start_nginx(tmp_path / "nginx", [p.target for p in processes.values()])
    try:
        with Client(front.target) as client:
            interaction, session_id, token = open_and_export(client, keep_open=True)
            victim = processes[holder({n: p.target for n, p in processes.items()}, session_id)]
            received, text, error = killed_mid_generation(interaction, victim)
            # nginx resets the client's stream: INTERNAL, where a direct channel says UNAVAILABLE
            assert error.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in error.details()
            survivor = next(p for p in processes.values() if p is not victim)
            with Client(survivor.target) as direct:  # the uninterrupted reference
                expected = resumed_tokens(direct, token, [], "", LONG)
            for _ in range(3):  # nginx skips the dead replica (connection refused) unseen by the client
                assert resumed_tokens(client, token, received, text, LONG) == expected
        assert "Connection refused" in front.log.read_text()
    finally:
        front.stop()
        for process in processes.values():
            if process.process.poll() is None:
                process.stop()


def test_a_draining_replica_behind_nginx_refuses_until_it_has_stopped(replicas, nginx):
    """nginx passes a draining replica's refusals on (a plain channel sees them); the Client retries
    them, and nginx's next pick is the other replica; once the replica has stopped, nginx skips it."""
    a = replicas[0]
    with (
        Client(f"127.0.0.1:{a.port}") as direct,
        Client(nginx.target) as client,
        grpc.insecure_channel(nginx.target) as plain,
    ):
        running = direct.generate("tiny", PROMPT, LONG)  # holds replica A in its drain for a while
        next(running)
        stopper = threading.Thread(target=a.call, args=(a.server.stop(30.0),))
        stopper.start()
        plain_codes, request = [], pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=4)
        for _ in range(10):
            try:
                list(pb_grpc.GenerationStub(plain).Generate(request))
                plain_codes.append("OK")
            except grpc.RpcError as exc:
                details = error_details(exc)
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and details.reason == "SERVER_DRAINING"
                assert details.retry_after_s == 0  # "retry on another replica": nginx's next pick
                plain_codes.append("UNAVAILABLE")
        assert plain_codes.count("UNAVAILABLE") == plain_codes.count("OK") == 5  # nginx's round robin
        for _ in range(10):  # refused on A, retried by the Client's channel, sent to B by nginx
            assert list(client.generate("tiny", PROMPT, 4))[-1].end.generated_tokens == 4
        assert a.app.active_streams == 1  # all the above happened during the drain
        list(running)
        stopper.join(60)
        for _ in range(20):  # stopped: connections refused, nginx goes to B without the client noticing
            response = list(pb_grpc.GenerationStub(plain).Generate(request))
            assert response[-1].end.generated_tokens == 4


def test_without_nginx_these_tests_fail_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(pytest.fail.Exception, match=r"nginx is not installed; install it: `make nginx`"):
        start_nginx(tmp_path, ["127.0.0.1:1"])
