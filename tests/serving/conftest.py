"""Fixtures for the server tests: a directory with the two committed LM bundles, and a running server."""

from __future__ import annotations

import shutil

import pytest

from serving.harness import ServerThread
from serving.runtime import LMRuntime
from tests.committed_bundles import committed
from tests.serving.serve_helpers import Stubs, config


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """models/tiny (char GRU, 1 layer, hidden 32) and models/tiny-lstm (char LSTM, 2 layers)."""
    root = tmp_path_factory.mktemp("models")
    for name in ("tiny", "tiny-lstm"):
        shutil.copytree(committed(name), root / name)
    return root


@pytest.fixture(scope="session")
def runtime(models_dir):
    return LMRuntime.load(models_dir / "tiny")


@pytest.fixture(scope="module")
def server(models_dir):
    """One server with default limits (max_tokens cap raised), shared by a test module."""
    with ServerThread(config(models_dir, max_tokens=100_000)) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(server):
    stubs = Stubs(server.port)
    yield stubs
    stubs.channel.close()
