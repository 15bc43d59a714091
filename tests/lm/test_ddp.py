"""Distributed language-model training on torchrun (2 gloo processes on loopback, 1 thread each):
the weights equal one process's on the same global batches, resume with another process count, a lost rank."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from lm.cli import main
from lm.distributed import Group
from lm.loop import StopRequest
from lm.metrics import read_metrics
from serving.errors import UsageError
from tests import torchrun
from tests.lm.conftest import TINY_FLAGS

# dropout 0: the ranks draw their own dropout masks, so only without dropout can weights match exactly
FLAGS = [*TINY_FLAGS, "--dropout", "0", "--dist-timeout", "60"]
TOLERANCE = 1e-5


def single(corpus: Path, out: Path, *extra: str) -> None:
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *FLAGS, *extra]) == 0


def distributed(corpus: Path, out: Path, *extra: str) -> list[str]:
    return torchrun.command("lm.cli", "train", "--corpus", str(corpus), "--out", str(out), *FLAGS, *extra)


def test_two_processes_train_the_weights_of_one_and_resume_with_either_count(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one20, one40, two20 = tmp_path / "one20", tmp_path / "one40", tmp_path / "two20"
    single(corpus_file, one20, "--max-steps", "20")
    single(corpus_file, one40, "--max-steps", "40")
    proc = torchrun.run(distributed(corpus_file, two20, "--max-steps", "20"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert torchrun.max_weight_difference(one20, two20, "lm") < TOLERANCE
    one, two = torchrun.checkpoint(one20, "lm"), torchrun.checkpoint(two20, "lm")
    assert two["world_size"] == 2 and len(two["rng_ranks"]) == 2
    # the carried state of all B streams, gathered from both ranks on rank 0
    assert two["carried_state"][0].shape == one["carried_state"][0].shape == (1, 4, 16)
    assert torchrun.same_tensors(one["carried_state"], two["carried_state"]) < TOLERANCE
    # rank 0 alone logs: the same records as one process, and the same validation figures
    mine, theirs = read_metrics(one20 / "metrics.jsonl"), read_metrics(two20 / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in mine] == [(r["split"], r["step"]) for r in theirs]
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in theirs], abs=1e-5)
    assert (two20 / "metrics.png").exists()

    # 2 processes -> 1: the run continues as if it had been one process all along
    resumed = tmp_path / "two20-then-one"
    shutil.copytree(two20, resumed)
    single(corpus_file, resumed, "--resume", "--max-steps", "40")
    assert torchrun.max_weight_difference(one40, resumed, "lm") < TOLERANCE

    # 1 process -> 2, launched by rnnlab-lm itself (--nproc runs torchrun)
    monkeypatch.setenv("PYTHONPATH", str(torchrun.ROOT))
    resumed = tmp_path / "one20-then-two"
    shutil.copytree(one20, resumed)
    argv = ["train", "--out", str(resumed), "--resume", "--max-steps", "40", "--nproc", "2"]
    assert main(argv) == 0
    assert torchrun.max_weight_difference(one40, resumed, "lm") < TOLERANCE
    assert torchrun.checkpoint(resumed, "lm")["step"] == 40


def test_a_killed_rank_stops_the_other_with_a_clear_error_and_the_run_resumes_exactly(
    tmp_path: Path, corpus_file: Path
) -> None:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    # with dropout: an exact resume needs every rank's own RNG back from the checkpoint
    endless = ["--epochs", "1000", "--checkpoint-every", "10", "--dist-timeout", "30", "--dropout", "0.3"]
    agent = torchrun.start(distributed(corpus_file, run, *endless), log)
    try:
        torchrun.wait_for(run / "last.pt", agent)
        torchrun.kill(torchrun.rank_pid(agent, 1))
        code = agent.wait(timeout=torchrun.TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
    output = log.read_text(errors="replace")
    assert code != 0, output[-3000:]
    # rank 0 names the lost rank and how to go on; torchrun's summary names it and its signal too
    assert "error: rank 0 of 2:" in output and "rank 1 is gone" in output, output[-3000:]
    assert "--resume" in output
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]

    saved = torchrun.checkpoint(run, "lm")["step"]
    assert saved > 0 and saved % 10 == 0
    until = ["--max-steps", str(saved + 15)]
    proc = torchrun.run(distributed(corpus_file, run, "--resume", *endless, *until))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torchrun.checkpoint(run, "lm")["step"] == saved + 15
    uninterrupted = tmp_path / "uninterrupted"
    proc = torchrun.run(distributed(corpus_file, uninterrupted, *endless, *until))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torchrun.max_weight_difference(uninterrupted, run, "lm") == 0.0


def test_sigterm_to_the_nproc_launcher_checkpoints_every_rank_and_exits_3(
    tmp_path: Path, corpus_file: Path
) -> None:
    run, log = tmp_path / "run", tmp_path / "launcher.log"
    argv = [
        "train",
        "--corpus",
        str(corpus_file),
        "--out",
        str(run),
        *FLAGS,
        "--epochs",
        "1000",
        "--nproc",
        "2",
    ]
    launcher = torchrun.start([sys.executable, "-m", "lm.cli", *argv], log)
    try:
        torchrun.wait_for(run / "metrics.jsonl", launcher)
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=torchrun.TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = log.read_text(errors="replace")
    assert code == 3, output[-3000:]
    assert output.count("interrupted; continue with: rnnlab-lm train") == 1  # rank 0 alone speaks
    saved = torchrun.checkpoint(run, "lm")
    assert saved["world_size"] == 2 and saved["step"] > 0


def test_the_process_count_must_divide_the_batch() -> None:
    group = Group(rank=1, world=2)
    assert group.rows(8) == slice(4, 8)
    group.check_divides(8, "batch_size")
    with pytest.raises(UsageError, match=r"3 processes do not divide --batch-size 32"):
        Group(rank=0, world=3).check_divides(32, "batch_size")


def test_a_signal_repeated_within_a_second_is_one_stop_request() -> None:
    """A terminal's Ctrl-C reaches torchrun's ranks twice (terminal, then the agent): still one request;
    a signal after that second still interrupts at once."""
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        time.sleep(StopRequest.REPEAT_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
