"""Helpers shared by the server tests (imported as tests.serving.serve_helpers)."""

from __future__ import annotations

import grpc

from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.config import ServerConfig

STATE_KEY = "test-state-key"


def config(models_dir, **overrides) -> ServerConfig:
    """A server on 127.0.0.1, port 0, with the tests' state key."""
    return ServerConfig(models=str(models_dir), port=0, state_key=STATE_KEY, **overrides).validate()


class Stubs:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.sessions = pb_grpc.SessionsStub(self.channel)
