"""rnnlab-serve as a real process: port 0, the client CLI against it, and a graceful drain on SIGTERM."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from serving import client_cli, server
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams
from tests.committed_bundles import committed

ROOT = Path(__file__).resolve().parents[2]
LONG = 12_000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(committed("tiny"), root / "tiny")
    return root


@pytest.fixture
def serve(models, tmp_path):
    """Starts `python -m serving.server` on port 0 and yields (process, "127.0.0.1:port")."""
    settings = tmp_path / "server.toml"
    settings.write_text(f"max_tokens = {LONG}\ngrace_s = 10.0\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RNNLAB_STATE_KEY": "e2e"}
    command = [sys.executable, "-m", "serving.server", "--models", str(models), "--port", "0",
               "--config", str(settings)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("rnnlab-serve listening on 127.0.0.1:"), process.stderr.read()
    yield process, line.split()[-1]
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_sigterm_drains_calls_in_flight_and_refuses_new_ones(serve):
    process, target = serve
    with Client(target) as client:
        stream = client.generate("tiny", "The Time", LONG, temperature=1.0, seed=1)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            list(client.generate("tiny", "The Time", 5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == LONG
    assert rest[-1].end.finish_reason == pb.FINISH_REASON_LENGTH
    assert process.wait(15) == 0


def test_client_cli_streams_lists_and_reports_errors(serve, models, capsys):
    _, target = serve
    runtime = LMRuntime.load(models / "tiny")
    expected = "".join(runtime.generate("The Time", 25, SamplingParams(temperature=0)))
    assert client_cli.main(["--target", target, "health", "--wait", "5"]) == 0
    assert client_cli.main(["--target", target, "generate", "tiny", "The Time", "--max-tokens", "25",
                            "--temperature", "0"]) == 0
    assert client_cli.main(["--target", target, "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "SERVING" and out[1] == expected and out[2].startswith("tiny\tgru x1 h32")
    assert client_cli.main(["--target", target, "generate", "nope", "x"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: no model 'nope'")


def test_client_cli_session_continues_each_line_of_stdin(serve, models, capsys, monkeypatch):
    _, target = serve
    runtime = LMRuntime.load(models / "tiny")
    greedy = SamplingParams(temperature=0)
    first = "".join(runtime.generate("The Time\n", 10, greedy))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nHis grey\n"))
    args = ["--target", target, "session", "tiny", "--prompt", "The Time", "--max-tokens", "10", "--export",
            "--temperature", "0"]
    assert client_cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == first
    assert len(lines) == 3 and base64.b64decode(lines[2]).startswith(b"RNST")


def test_server_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert server.main(["--models", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: port must be in 0..65535, not 70000"
    assert server.main(["--models", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not a directory" in capsys.readouterr().err
