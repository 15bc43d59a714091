"""Helpers of the replica tests (tests/serving/test_replicas.py, test_nginx.py): replicas sharing a key file,
an Interact session driven message by message, which replica holds a session."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.replicas import Nginx, NginxMissing, nginx_binary
from bench.serve_load import ServerProcess
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client
from serving.config import ServerConfig
from serving.harness import ServerThread
from tests.committed_bundles import committed

KEY = "replica-test-key-0123456789\n"
LONG = 8_000  # tokens of a stream still running when the test drains or kills its replica (~1.5 s)
PROMPT = "The Time Traveller "


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.key"
    path.write_text(KEY)
    return path


def thread_config(key: Path, **overrides) -> ServerConfig:
    """A ServerThread replica of tests/bundles/tiny on a free loopback port, signing with ``key``."""
    config = ServerConfig(models=str(committed("tiny")), port=0, state_key_file=str(key), **overrides)
    return config.validate()


@contextlib.contextmanager
def thread_replicas(tmp_path: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two ServerThread replicas sharing a key file, streams up to LONG tokens, a drain grace of 30 s."""
    key = key_file(tmp_path)
    settings = {"max_tokens": LONG, "grace_s": 30.0}
    with ServerThread(thread_config(key, **settings)) as a, ServerThread(thread_config(key, **settings)) as b:
        yield a, b


def replica_process(tmp_path: Path, key: Path) -> ServerProcess:
    """``python -m serving.server --state-key-file KEY`` serving tests/bundles/tiny (one we can SIGKILL)."""
    settings = tmp_path / "server.toml"
    settings.write_text(f"max_tokens = {LONG}\n")
    flags = ("--config", str(settings), "--state-key-file", str(key), "--log-level", "WARNING")
    return ServerProcess(committed("tiny"), *flags)


def start_nginx(run_dir: Path, replicas: list[str]) -> Nginx:
    """nginx on deploy/nginx/nginx.conf; a test that needs it fails (never skips) when it is missing."""
    try:
        nginx_binary()
    except NginxMissing as exc:
        pytest.fail(str(exc))
    return Nginx(run_dir, replicas)


class Interaction:
    """One Interact stream fed message by message: ``send(request)``, ``next()`` reads an answer."""

    def __init__(self, client: Client) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._answers = client.interact(iter(self._requests.get, None), timeout=60)

    def send(self, **action) -> None:
        self._requests.put(pb.InteractRequest(**action))

    def next(self) -> pb.InteractResponse:
        return next(self._answers)

    def generation(self, max_tokens: int) -> Iterator[pb.GenerateResponse]:
        """Greedy generation in the session, message by message, up to the one with ``end``."""
        self.send(generate=pb.SessionGenerateRequest(max_tokens=max_tokens))
        while True:
            message = self.next().generation
            yield message
            if message.HasField("end"):
                return

    def close(self) -> None:
        self._requests.put(None)


def open_and_export(client: Client, keep_open: bool = False) -> tuple[Interaction, str, bytes]:
    """An Interact session on tests/bundles/tiny that has read PROMPT: (the stream, session id, a state
    token taken before any generation: what a client keeps to resume elsewhere)."""
    interaction = Interaction(client)
    interaction.send(open=pb.OpenSessionRequest(model="tiny", prompt=PROMPT), keep_open=keep_open)
    session_id = interaction.next().session.session_id
    interaction.send(export=True)
    return interaction, session_id, interaction.next().state.token


def killed_mid_generation(
    interaction: Interaction, replica: ServerProcess
) -> tuple[list[int], str, grpc.RpcError]:
    """A greedy generation of LONG tokens whose replica gets SIGKILL once its first message arrived: the
    tokens and text received, and the error that ended the stream."""
    received, text = [], ""
    with pytest.raises(grpc.RpcError) as killed:
        for message in interaction.generation(LONG):
            received += message.token_ids
            text += message.text
            if replica.process.poll() is None:
                replica.process.kill()
    interaction.close()
    assert 0 < len(received) < LONG
    return received, text, killed.value


def resumed_tokens(client: Client, token: bytes, received: list[int], text: str, total: int) -> list[int]:
    """An interrupted greedy generation of ``total`` tokens completed: in one Interact stream (one replica
    whatever balances the calls), resume the state token taken before it, read the ``text`` of the
    ``received`` tokens, generate the rest."""
    interaction = Interaction(client)
    interaction.send(resume_token=token)
    interaction.next()
    if text:
        interaction.send(append=text)
        interaction.next()
    rest = [i for m in interaction.generation(total - len(received)) for i in m.token_ids]
    interaction.close()
    return received + rest


def holder(replicas: dict[str, str], session_id: str) -> str:
    """The name of the replica that holds ``session_id`` (Export reads a session without changing it)."""
    for name, target in replicas.items():
        with Client(target) as direct:
            try:
                direct.sessions.Export(pb.ExportSessionRequest(session_id=session_id), timeout=10)
                return name
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
    raise AssertionError(f"no replica holds session {session_id}")


def calls(servers, expected: float, method: str = "GenerationService.Generate") -> list[float]:
    """Calls of ``method`` each ServerThread replica has answered, whatever their code
    (rnnlab_requests_total), once their sum reaches ``expected`` (a server counts as its handler ends,
    maybe just after the client has its answer), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        counts = [
            sum(
                sample.value
                for metric in server.app.metrics.registry.collect()
                for sample in metric.samples
                if sample.name == "rnnlab_requests_total" and sample.labels["method"] == method
            )
            for server in servers
        ]
        if sum(counts) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.01)
