"""Data-parallel training on torchrun: every rank trains its share of each global batch in the one loop.

``torchrun --nproc-per-node N -m lm.cli train ...`` (or ``rnnlab-lm train --nproc N``, which runs that
command itself through :func:`launch`) starts N processes; :func:`session` joins them into one process
group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): gloo, plus NCCL for
CUDA tensors when CUDA is available, with a collective timeout so that a lost or hung rank makes the
others fail instead of waiting forever. Outside torchrun the process is alone and nothing here costs anything.

Semantics (docs/distributed.md): the global batch is the batch one process would train on. A family
takes its rank's share of it (:meth:`Group.rows`: the language model's contiguous block of streams, so a
stream's carried state stays on its rank; :meth:`Group.share`: the translator's slice of a batch's
sentences) and returns its *share of the global loss* (the shares of all ranks sum to the loss of the
global batch). DistributedDataParallel averages gradients over the ranks, so the loop backpropagates
``world * share`` (:meth:`Group.scale_loss`): the all-reduced gradient is the single-process gradient.

What else the loop asks of the group: agreement on when to stop (:meth:`Group.any_of`: a signal or a
time budget seen by one rank stops all at the same step), global sums for the logs, rank 0's validation
figures for every rank (:meth:`Group.from_rank0`), rank 0's reading of ``last.pt`` for every rank
(:meth:`Group.on_rank0`), the carried state and the ranks' RNG states gathered into rank 0's checkpoint.
Only rank 0 writes files (:attr:`Group.writes`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lm.config import DIST_TIMEOUT_S, flag
from lm.rng import capture_rng_state, restore_rng_state, seed_everything
from serving.errors import ExitCode, Interrupted, UsageError, UserError
from serving.tokenizers import Tokenizer, tokenizer_from_dict

T = TypeVar("T")


class DistributedError(Interrupted):
    """Another rank was lost or timed out: this rank stops (exit 3) and the run resumes with --resume."""


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of a run (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the run directory (checkpoints, metrics, plot, tensorboard)."""
        return self.rank == 0

    # ----- a rank's share of a global batch ----------------------------------------------------------
    def check_divides(self, total: int, name: str) -> None:
        if total % self.world:
            raise UsageError(
                f"{self.world} processes do not divide {flag(name)} {total}: each rank trains a contiguous "
                f"block of {flag(name)} / N streams; use --nproc (or torchrun's --nproc-per-node) dividing it"
            )

    def rows(self, total: int) -> slice:
        """This rank's contiguous block of ``total`` rows (``total`` divisible by the world size)."""
        size = total // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def share(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of ``items`` (sizes differ by at most one; empty if too few)."""
        return np.array_split(items, self.world)[self.rank]

    def scale_loss(self, share: Tensor) -> Tensor:
        """The loss to backpropagate: DDP averages the ranks' gradients, the shares must add up."""
        return share * self.world if self.active else share

    # ----- agreement ----------------------------------------------------------------------------------
    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any rank (a stop seen by one rank is acted on by all at the same step)."""
        if not self.active:
            return flags
        votes = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        _collective("stop agreement", dist.all_reduce, votes, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in votes.tolist())

    def totals(self, *values: Tensor | float) -> list[float]:
        """Sums over the ranks (log figures: loss shares, token counts)."""
        if not self.active:
            return [float(v) for v in values]
        sums = torch.tensor([float(v) for v in values], dtype=torch.float64)
        _collective("log sums", dist.all_reduce, sums)
        return sums.tolist()

    def from_rank0(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (so that every rank takes the same decisions)."""
        if not self.active:
            return value
        box = [value]
        _collective("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def on_rank0(self, read: Callable[[], T]) -> T:
        """``read()`` run on rank 0 only; its result, or the UserError it raised, on every rank."""
        if not self.active:
            return read()
        outcome: tuple[bool, Any] = (True, None)
        if self.rank == 0:
            try:
                outcome = (True, read())
            except UserError as exc:
                outcome = (False, exc)
        ok, value = self.from_rank0(outcome)
        if not ok:
            raise value
        return value

    def tokenizers(self, train: Callable[[], list[Tokenizer]]) -> list[Tokenizer]:
        """Tokenizers trained on rank 0 only and sent to every rank (the same vocabulary everywhere)."""
        if not self.active:
            return train()
        documents = self.on_rank0(lambda: [t.to_dict() for t in train()])
        return [tokenizer_from_dict(d) for d in documents]

    def gather_rows(self, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Each tensor (L, B/N, ...) of every rank -> (L, B, ...) in rank order, on every rank."""
        if not self.active:
            return state
        whole = []
        for part in state:
            parts = [torch.empty_like(part) for _ in range(self.world)]
            _collective("state gather", dist.all_gather, parts, part.contiguous())
            whole.append(torch.cat(parts, dim=1))
        return tuple(whole)

    # ----- model and random streams -------------------------------------------------------------------
    def replicate(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel (its other attributes pass through)."""
        return _Replica(model)

    def rng_payload(self) -> dict[str, Any]:
        """What a checkpoint holds of the global RNGs: rank 0's (as a single process's) and every rank's."""
        rng = capture_rng_state()
        if not self.active:
            return {"rng": rng, "world_size": 1}
        ranks: list[Any] = [None] * self.world
        _collective("rng gather", dist.all_gather_object, ranks, rng)
        return {"rng": rng, "rng_ranks": ranks, "world_size": self.world}

    def restore_rng(self, payload: dict[str, Any], seed: int, step: int) -> None:
        """The RNG streams of a resumed run: each rank's own when N is unchanged (exact resume); fresh
        per-rank streams drawn from (seed, step, rank) when N changed (dropout masks then differ)."""
        saved = int(payload.get("world_size", 1))
        if saved == self.world:
            restore_rng_state(payload["rng_ranks"][self.rank] if self.active else payload["rng"])
            return
        self.seed_rank(seed, step)
        if self.writes:
            print(
                f"resuming a run of {saved} processes with {self.world}: same batches, weights and carried "
                "states; the dropout masks from here on differ from an uninterrupted run",
                file=sys.stderr,
            )

    def seed_rank(self, seed: int, step: int) -> None:
        """Distinct global RNG streams per rank (dropout), a function of (seed, step, rank)."""
        seed_everything(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0]))


class _Replica(DistributedDataParallel):
    """DDP that a family uses in place of its model: ``init_state``, ``config``, ``encode`` ... reach the
    module; without gradients (validation, search) the module runs alone, no collective involved."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)


def _collective(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except (dist.DistError, RuntimeError) as exc:
        raise lost_rank(what, exc) from exc


def lost_rank(what: str, exc: BaseException) -> DistributedError:
    group = current()
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    reason = re.sub(r"^\[[^\]]*\] ", "", reason).split(". This is typically")[0][:200]  # gloo's source path
    with _sigterm_ignored():  # torchrun's agent sends SIGTERM to the survivors now: finish this line
        gone = _gone_ranks(group)
    lost = f"rank {', '.join(map(str, gone))} is gone" if gone else "another rank was lost or timed out"
    return DistributedError(
        f"rank {group.rank} of {group.world}: {what} failed, {lost} ({reason}); torchrun's summary names "
        "the rank that failed first. The run resumes from its last checkpoint with --resume"
    )


@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: handlers cannot change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PID_KEY = "rnnlab/pid/{}"


def _announce(group: Group) -> None:
    """Each rank leaves ``host:pid`` in torchrun's store, so that a rank can name a lost one."""
    _store().set(_PID_KEY.format(group.rank), f"{socket.gethostname()}:{os.getpid()}")


def _gone_ranks(group: Group) -> list[int]:
    """Ranks on this machine whose process has ended (others cannot be seen from here). A killed
    process closes its sockets a moment before it ends: look for up to a second."""
    try:
        store = _store()
        store.set_timeout(timedelta(seconds=5))
        peers = {r: store.get(_PID_KEY.format(r)).decode().rsplit(":", 1) for r in range(group.world)}
    except Exception:  # the store may be gone too: then say less
        return []
    local = [r for r, (host, _) in peers.items() if r != group.rank and host == socket.gethostname()]
    for _ in range(10):
        gone = [r for r in local if not _alive(peers[r][1])]
        if gone:
            return gone
        time.sleep(0.1)
    return []


def _alive(pid: str) -> bool:
    try:  # a killed rank stays a zombie (state Z) until torchrun reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


_GROUP = Group()


def current() -> Group:
    """The group of this process: the one :func:`session` joined, else rank 0 of 1."""
    return _GROUP


def backend() -> str:
    """gloo; with CUDA also NCCL for CUDA tensors (the loop itself trains on the CPU, whose tensors
    NCCL cannot reduce)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def default_threads(local_world: int) -> int:
    """All the cores of the machine shared among its ranks (torchrun itself sets OMP_NUM_THREADS=1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


@contextlib.contextmanager
def session(timeout_s: float = DIST_TIMEOUT_S) -> Iterator[Group]:
    """Joins torchrun's process group for the duration of a training command (alone: no-op).

    A collective that fails (a rank killed, or silent for ``timeout_s``) becomes DistributedError.
    """
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        yield _GROUP
        return
    if timeout_s <= 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, not {timeout_s}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend(), timeout=timedelta(seconds=timeout_s))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), local_world)
    _announce(_GROUP)
    torch.set_num_threads(default_threads(local_world))  # --threads overrides it (lm.loop)
    try:
        yield _GROUP
        # leave together: a rank tearing its group down while rank 0 still writes the plot aborted
        # ("terminate called without an active exception") in about one run of six
        _collective("final barrier", dist.barrier)
    except (dist.DistError, RuntimeError) as exc:
        # DDP's all-reduce runs inside backward(): a lost rank surfaces there
        if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
            raise lost_rank("gradient all-reduce", exc) from exc
        raise
    finally:
        _GROUP = Group()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ----- the command line ------------------------------------------------------------------------------
def train_command(args: Any, module: str, train: Callable[[], int]) -> int:
    """Runs a family's ``train`` command: under ``--nproc N`` through torchrun, else in this process
    (as one rank of torchrun's group when started by torchrun)."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, not {nproc}")
    if nproc > 1 and "RANK" not in os.environ:
        return launch(module, relaunch_flags(args), nproc)
    with session(getattr(args, "dist_timeout", DIST_TIMEOUT_S)):
        return train()


def relaunch_flags(args: Any) -> list[str]:
    """The ``train`` command line of ``args`` without ``--nproc`` (the flags given, defaults suppressed)."""
    words = [args.command]
    for name, value in vars(args).items():
        if name in ("command", "func", "nproc"):
            continue
        if value is True or value is False:
            words.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            words += [flag(name), str(value)]
    return words


def launch(module: str, flags: list[str], nproc: int) -> int:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE FLAGS``; returns its
    exit code, or ExitCode.INTERRUPTED after a signal: SIGTERM is passed on, Ctrl-C reaches the ranks
    from the terminal; either way they checkpoint and stop, and torchrun reports that as a failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    process = subprocess.Popen([*command, "-m", module, *flags])
    signals: list[int] = []

    def note(signum: int, frame: Any) -> None:
        signals.append(signum)
        if signum == signal.SIGTERM:
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
        return int(ExitCode.INTERRUPTED) if signals and code else code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
