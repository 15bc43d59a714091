"""Fixtures for the server tests: a directory with two tiny trained bundles, and a running server."""

from __future__ import annotations

import grpc
import pytest
from tiny_bundles import make_tiny_bundle

from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.config import ServerConfig
from serving.runtime import LMRuntime
from serving.server import ServerThread

STATE_KEY = "test-state-key"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """models/tiny (char GRU, 1 layer, hidden 32) and models/tiny-lstm (char LSTM, 2 layers)."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_bundle(root, "gru", name="tiny")
    make_tiny_bundle(root, "lstm", name="tiny-lstm", layers=2)
    return root


@pytest.fixture(scope="session")
def runtime(models_dir):
    return LMRuntime.load(models_dir / "tiny")


def config(models_dir, **overrides) -> ServerConfig:
    return ServerConfig(models=str(models_dir), port=0, state_key=STATE_KEY, **overrides).validate()


@pytest.fixture(scope="module")
def server(models_dir):
    """One server on 127.0.0.1, port 0, default limits, shared by a test module."""
    with ServerThread(config(models_dir, max_tokens=100_000)) as running:
        yield running


class Stubs:
    def __init__(self, port: int, metadata: tuple = ()) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.sessions = pb_grpc.SessionsStub(self.channel)


@pytest.fixture(scope="module")
def stubs(server):
    stubs = Stubs(server.port)
    yield stubs
    stubs.channel.close()
