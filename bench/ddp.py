"""Data-parallel training: 2 processes x 1 thread against 1 process x 2 threads, side by side in one run,
and a paper estimate of scaling to 8 and 64 workers.

Both sides are the real command, ``rnnlab-lm train`` at its defaults (char GRU 2x256 on The Time Machine,
batch 32 x bptt 64) with ``--max-steps``: under ``torchrun --nproc-per-node 2`` with ``--threads 1``, and
alone with ``--threads 2``. Their figure is the ``tokens_per_s`` of ``metrics.jsonl`` (global tokens of
the whole run per second; the first window, start-up, is dropped); repeats alternate the order.

The estimate: the gradient all-reduce moves the model's gradient bytes (measured from the model); ring
all-reduce costs ``2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency``; a worker's compute per step is
the measured step time of one process x 1 thread on its share (the 2-process run's per-step time minus
the all-reduce measured on loopback here). Weak scaling: each worker keeps B/2 = 16 streams, so the
global batch grows with N. No overlap of the all-reduce with backward is assumed (DDP does overlap), so
the estimate is pessimistic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import ROOT
from bench.lm_common import write_result
from lm.config import TrainConfig
from lm.metrics import read_metrics

NETWORKS = {  # bandwidth (bytes/s) and per-message latency (s) assumed for the estimate
    "10GbE": (10e9 / 8, 50e-6),
    "100Gb InfiniBand": (100e9 / 8, 5e-6),
}
WORKERS = (2, 8, 64)


def run_lm(out: Path, steps: int, nproc: int) -> list[float]:
    """tokens/s of the train records of one ``rnnlab-lm train`` run (first window dropped)."""
    flags = ["train", "--out", str(out), "--max-steps", str(steps), "--log-every", "10", "--no-progress"]
    flags += ["--checkpoint-every", "0", "--patience", "0", "--threads", "1" if nproc > 1 else "2"]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command = [sys.executable, *launcher, "-m", "lm.cli", *flags]
    else:
        command = [sys.executable, "-m", "lm.cli", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    rates = [r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    return rates[1:]


def gradient_bytes() -> int:
    """Bytes of the default model's gradients (float32), what each step all-reduces."""
    from lm.model import RNNLM
    from lm.train import prepare_corpus

    config = TrainConfig()
    vocab = prepare_corpus(config).tokenizer.vocab_size
    model = RNNLM(config.model_config(vocab))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _allreduce_worker(rank: int, size: int, repeats: int, port: int, result: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    buffer = torch.ones(size // 4)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    if rank == 0:
        result.write_text(str(statistics.median(times[1:])))
    dist.destroy_process_group()


def loopback_allreduce_s(size: int, repeats: int = 30) -> float:
    """Median time of one gloo all-reduce of ``size`` bytes between 2 processes on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "seconds"
        port = 29500 + os.getpid() % 1000
        mp.spawn(_allreduce_worker, args=(size, repeats, port, result), nprocs=2, join=True)
        return float(result.read_text())


def estimate(step_compute_s: float, size: int, tokens_per_worker: int) -> dict[str, dict]:
    """Weak-scaling tokens/s and efficiency at each N for each assumed network (ring all-reduce)."""
    table: dict[str, dict] = {}
    for name, (bandwidth, latency) in NETWORKS.items():
        rows = {}
        for n in WORKERS:
            allreduce = 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * latency
            step = step_compute_s + allreduce
            rows[str(n)] = {
                "allreduce_ms": round(allreduce * 1e3, 3),
                "step_ms": round(step * 1e3, 2),
                "tokens_per_s": round(n * tokens_per_worker / step),
                "efficiency": round(step_compute_s / step, 3),
            }
        table[name] = {"bandwidth_bytes_per_s": bandwidth, "latency_s": latency, "workers": rows}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"2 processes x 1 thread": [], "1 process x 2 threads": []}
    runs = []  # the machine is shared: each run with the load it started under
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = [2, 1] if repeat % 2 == 0 else [1, 2]
            for nproc in order:
                key = "2 processes x 1 thread" if nproc == 2 else "1 process x 2 threads"
                load = round(os.getloadavg()[0], 2)
                run_rates = run_lm(Path(tmp) / f"run{repeat}-{nproc}", args.steps, nproc)
                rates[key] += run_rates
                runs.append(
                    {"side": key, "load_avg_1m_before": load, "tokens_per_s": [round(r) for r in run_rates]}
                )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    two, one = medians["2 processes x 1 thread"], medians["1 process x 2 threads"]
    config = TrainConfig()
    tokens_per_step = config.data.batch_size * config.data.bptt
    size = gradient_bytes()
    allreduce_s = loopback_allreduce_s(size)
    step_two = tokens_per_step / two  # per-rank step of 16 streams
    compute_s = max(step_two - allreduce_s, 1e-9)
    model = config.model
    write_result(
        "ddp",
        {
            "command": "rnnlab-lm train (defaults) --max-steps N: torchrun --nproc-per-node 2 --threads 1 "
            "vs one process --threads 2",
            "model": f"{model.cell} x{model.layers} hidden {model.hidden} embed {model.embed}",
            "global_batch": [config.data.batch_size, config.data.bptt],
            "steps_per_run": args.steps,
            "repeats": args.repeats,
            "runs": runs,
            "median_tokens_per_s": {k: round(v) for k, v in medians.items()},
            "ratio_2x1_over_1x2": round(two / one, 3),
            "gradient_bytes": size,
            "loopback_gloo_allreduce_ms": round(allreduce_s * 1e3, 3),
            "step_ms_2x1": round(step_two * 1e3, 2),
            "compute_ms_per_worker": round(compute_s * 1e3, 2),
            "estimate": {
                "assumptions": "weak scaling, 16 streams x 64 tokens per worker; ring all-reduce "
                "2(N-1)/N * bytes / bandwidth + 2(N-1) * latency; no overlap with backward",
                "networks": estimate(compute_s, size, tokens_per_step // 2),
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
