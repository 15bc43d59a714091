"""Stateless replicas: one state key file, client-side round_robin over replicas, health-checked draining,
a session moving between replicas on its state token, a replica killed mid-stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from serving import client_cli, server, state_token
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.client import Client, channel_target
from serving.config import ConfigError, ServerConfig
from serving.harness import ServerThread
from tests.committed_bundles import committed
from tests.serving.replica_helpers import (
    KEY,
    LONG,
    PROMPT,
    calls,
    key_file,
    killed_mid_generation,
    open_and_export,
    replica_process,
    resumed_tokens,
    thread_config,
    thread_replicas,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_state_key_file_is_read_stripped_and_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(state_token.KEY_ENV, "from-the-environment")
    with ServerThread(thread_config(key_file(tmp_path))) as running:
        assert running.app.state_key == KEY.strip().encode()
    assert state_token.resolve_key(None, None) == b"from-the-environment"
    assert state_token.resolve_key("configured", None) == b"configured"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read state key file"), ("short\n", "holds 5 bytes; at least 16")],
)
def test_a_missing_or_short_key_file_stops_the_server_naming_the_file(tmp_path, content, message):
    path = tmp_path / "state.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(state_token.StateKeyError, match=message) as refused:
        ServerConfig(models=str(committed("tiny")), state_key_file=str(path)).validate()
    assert str(path) in str(refused.value)
    command = [sys.executable, "-m", "serving.server", "--models", str(committed("tiny")), "--port", "0"]
    done = subprocess.run(
        [*command, "--state-key-file", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert str(path) in done.stderr and message in done.stderr


def test_state_key_and_key_file_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        ServerConfig(state_key="k" * 16, state_key_file=str(key_file(tmp_path))).validate()


def test_a_target_list_becomes_one_address_list():
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["127.0.0.1:1,127.0.0.1:2", "127.0.0.1:1"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///rnnlab-replicas:50151") == "dns:///rnnlab-replicas:50151"
    with pytest.raises(ValueError, match="only target"):
        channel_target("dns:///a:1,127.0.0.1:2")
    with pytest.raises(ValueError, match="not host:port"):
        channel_target("127.0.0.1,127.0.0.1:2")


@pytest.fixture
def two_replicas(tmp_path):
    with thread_replicas(tmp_path) as pair:
        yield pair


def test_round_robin_spreads_streams_over_both_replicas(two_replicas, capsys):
    a, b = two_replicas
    with Client([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as client:
        client.health(timeout=10)  # connected
        for seed in range(20):
            assert len(list(client.generate("tiny", PROMPT, 8, temperature=1.0, seed=seed))) >= 1
    counts = calls((a, b), 20)
    assert sum(counts) == 20 and min(counts) >= 5
    # rnnlab-client: the flag repeated and comma-separated
    targets = ["--target", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", "--target", f"127.0.0.1:{a.port}"]
    assert client_cli.build_parser().parse_args([*targets, "models"]).target == targets[1::2]
    for _ in range(6):
        assert client_cli.main([*targets, "generate", "tiny", PROMPT, "--max-tokens", "4"]) == 0
    assert sum(calls((a, b), 26)) == 26
    assert capsys.readouterr().out.strip()


def test_a_session_started_on_a_continues_on_b_from_its_state_token(two_replicas):
    a, b = two_replicas
    with Client(f"127.0.0.1:{a.port}") as on_a, Client(f"127.0.0.1:{b.port}") as on_b:
        session = on_a.open_session("tiny", prompt=PROMPT)
        first = [i for m in session.generate(40) for i in m.token_ids]
        token = session.export()
        stayed = [i for m in session.generate(120) for i in m.token_ids]
        moved = on_b.resume(token)
        assert [i for m in moved.generate(120) for i in m.token_ids] == stayed
        assert moved.tokens == session.tokens and len(first) == 40


def plain_round_robin(targets: list[str]) -> grpc.Channel:
    """A channel balancing round_robin, without the Client's health checking and retries."""
    config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    return grpc.insecure_channel(channel_target(targets), [("grpc.service_config", config)])


@pytest.mark.parametrize("channel", ["client", "client without health checking", "plain round_robin"])
def test_health_checking_takes_a_draining_replica_out_of_the_rotation(two_replicas, channel):
    """The Client's channel (health checking, the default over several addresses) sends no call to a
    draining replica; without health checking its retries take the replica's refusals to the other one;
    a plain round_robin channel gets UNAVAILABLE [SERVER_DRAINING] for the calls it picks the replica for."""
    a, b = two_replicas
    targets = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    with Client(targets, health_check=channel == "client") as client, plain_round_robin(targets) as plain:
        stub = pb_grpc.GenerationStub(plain) if channel == "plain round_robin" else client.generation
        for _ in range(4):
            list(stub.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=4)))
        running = stub.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=LONG))
        first = next(running)  # keeps its replica draining for a while
        victim, other = (a, b) if a.app.active_streams else (b, a)
        before = calls([victim, other], 0)
        stopper = threading.Thread(target=victim.call, args=(victim.server.stop(30.0),))
        stopper.start()
        time.sleep(0.3)  # the replica's health Watch has answered NOT_SERVING
        refused = 0
        for _ in range(20):
            try:
                list(stub.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=4)))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.details()
                refused += 1
        assert len(first.token_ids) + sum(len(m.token_ids) for m in running) == LONG  # finished in the drain
        stopper.join(60)
    reached_victim = calls([victim], before[0] + 1)[0] - before[0] - 1  # less the long call
    served = calls([other], before[1] + 20 - refused)[0] - before[1]
    if channel == "client":
        assert (refused, reached_victim, served) == (0, 0, 20)
    elif channel == "client without health checking":  # refused there, retried here
        assert refused == 0 and reached_victim >= 5 and served == 20
    else:
        assert 5 <= refused <= 15 and reached_victim == refused and served == 20 - refused


def test_a_replica_killed_mid_stream_and_the_session_resumes_on_the_other(tmp_path):
    """SIGKILL of replica A during a greedy session generation: the client sees UNAVAILABLE, resumes the
    state token it took before the generation on the round_robin channel (now only B), reads the tokens
    it had received and generates the rest: the same tokens as an uninterrupted run."""
    key = key_file(tmp_path)
    a, b = replica_process(tmp_path, key), replica_process(tmp_path, key)
    try:
        with Client(b.target) as on_b:  # the uninterrupted reference
            session = on_b.open_session("tiny", prompt=PROMPT)
            expected = [i for m in session.generate(LONG) for i in m.token_ids]
        with Client(a.target) as on_a, Client([a.target, b.target]) as replicas:
            interaction, _, token = open_and_export(on_a)
            received, text, error = killed_mid_generation(interaction, a)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert resumed_tokens(replicas, token, received, text, LONG) == expected
    finally:
        for replica in (a, b):
            if replica.process.poll() is None:
                replica.stop()


def test_the_kubernetes_manifest_is_the_one_in_the_docs_and_uses_real_flags():
    manifest = Path(ROOT) / "deploy" / "kubernetes" / "rnnlab.yaml"
    docs = (Path(ROOT) / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert f"```yaml\n{manifest.read_text(encoding='utf-8')}```" in docs
    secret, deployment, service = yaml.safe_load_all(manifest.read_text(encoding="utf-8"))
    pod = deployment["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    args = server.build_parser().parse_args(command[1:])  # argparse exits on an unknown flag
    mount = pod["containers"][0]["volumeMounts"][0]
    assert command[0] == "rnnlab-serve" and Path(args.state_key_file).parent == Path(mount["mountPath"])
    assert pod["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    assert Path(args.state_key_file).name in secret["stringData"]
    assert pod["terminationGracePeriodSeconds"] > args.grace_s
    assert pod["containers"][0]["readinessProbe"]["grpc"]["port"] == args.port
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == args.port
