"""Real torchrun runs for the distributed-training tests: 2 gloo processes on loopback, 1 thread each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lm.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hang fails the test instead of blocking the suite


def command(module: str, *argv: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGV``."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*runner, "-m", module, *argv]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Starts torchrun in its own session, its output (agent and ranks) into ``log``."""
    with open(log, "wb") as sink:
        return subprocess.Popen(
            argv, cwd=ROOT, env=environment(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def rank_pid(agent: subprocess.Popen[bytes], rank: int) -> int:
    """The pid of the worker of ``rank`` among the agent's children (torchrun sets RANK in their env)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def wait_for(path: Path, agent: subprocess.Popen[bytes], timeout_s: float = TIMEOUT_S) -> None:
    """Until ``path`` exists and holds something (a metrics record: every rank is in the loop)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.stat().st_size:
        assert agent.poll() is None, f"torchrun exited ({agent.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def checkpoint(run_dir: Path, kind: str) -> dict:
    return load_checkpoint(run_dir / "last.pt", kind)


def max_weight_difference(a: Path, b: Path, kind: str) -> float:
    """The largest absolute difference between the weights of two runs' last.pt."""
    wa, wb = checkpoint(a, kind)["model"], checkpoint(b, kind)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def write_toml(sections: dict[str, dict], path: Path) -> Path:
    """A training config's ``to_sections()`` as a TOML file for ``--config`` (strings, numbers, bools)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
