"""The parallel cells (mamba, mingru) against GRU and LSTM: training tokens/s, SSM formulations, decode step.

All at torch's default threads, measured side by side in one process: each repetition runs every case
once in turn (round robin) and the medians are compared, so machine load affects all cases alike.

1. Training: one optimizer step (forward, cross-entropy, backward, AdamW) of the whole language model on
   a batch of 32 windows of 35, 128 and 512 characters (65-symbol vocabulary), at about 0.7 M and about
   3 M parameters; tokens/s and the ratio to the GRU of the same size.
2. Formulations, the recurrence alone (forward + backward) on one layer's tensors: Mamba-2's chunked SSD
   against a Mamba-1 style selective scan over a (batch, time, channels, state) tensor; minGRU's
   chunked scan (``scan_blocked``) against the paper's log-space scan.
3. Decode: ``StatefulDecoder.step`` (the server's decode loop) through onnxruntime on the exported
   bundles of the 0.7 M models at batch 1 and 64, against the GRU bundle of the same size, with one
   intra-op thread per session as the server runs them (four sessions with two spinning threads each,
   called in turn, measured mamba's batch-64 step 13x slower than the same session alone).

4. Where the time goes: torch profiler self CPU time of one training step (0.7 M, 128-token windows)
   per operator for the GRU and the parallel cells, grouped as matrix products, the recurrence
   (the scan's autograd nodes / the GRU kernel) and everything else.

    python -m bench.lm_cells [--reps 5] [--decode-reps 2000] [--windows 35,128,512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bench.lm_common import write_result
from lm.export import export_lm
from lm.mingru import LinearScan, scan_blocked, scan_log
from lm.model import RNNLM, ModelConfig
from lm.ssm import ssd
from serving.runtime import LMRuntime
from serving.stateful_decoder import StatefulDecoder
from serving.tokenizers import CharTokenizer
from serving.vocab import Vocab

VOCAB, BATCH, WINDOWS = 65, 32, (35, 128, 512)
# Equal parameter counts (printed with the results): the classic cells as lm_throughput and
# lm_shakespeare size them; the parallel cells with expand 2 (6·d² parameters a layer), mingru also with
# expand 1 and a wider residual stream (same parameters, a third fewer scanned channels), each in fp32 and
# with bf16 training matmuls (``--precision bf16``; torch's GRU and LSTM have no faster bf16 path: the
# GRU's step under bf16 autocast measured slower than in fp32).
SIZES = {
    "0.7M": {
        "gru": dict(cell="gru", layers=2, embed=64, hidden=256),
        "lstm": dict(cell="lstm", layers=2, embed=64, hidden=220),
        "mamba": dict(cell="mamba", layers=2, embed=224, hidden=224, heads=2),
        "mamba bf16": dict(cell="mamba", layers=2, embed=224, hidden=224, heads=2, precision="bf16"),
        "mingru": dict(cell="mingru", layers=2, embed=224, hidden=224),
        "mingru bf16": dict(cell="mingru", layers=2, embed=224, hidden=224, precision="bf16"),
        "mingru e1 bf16": dict(cell="mingru", layers=2, embed=316, hidden=316, expand=1, precision="bf16"),
    },
    "3M": {
        "gru": dict(cell="gru", layers=2, embed=128, hidden=560),
        "lstm": dict(cell="lstm", layers=2, embed=128, hidden=490),
        "mamba": dict(cell="mamba", layers=3, embed=400, hidden=400, heads=4),
        "mamba bf16": dict(cell="mamba", layers=3, embed=400, hidden=400, heads=4, precision="bf16"),
        "mingru": dict(cell="mingru", layers=3, embed=400, hidden=400),
        "mingru bf16": dict(cell="mingru", layers=3, embed=400, hidden=400, precision="bf16"),
        "mingru e1 bf16": dict(cell="mingru", layers=3, embed=566, hidden=566, expand=1, precision="bf16"),
    },
}
DECODE_CELLS = ("gru", "lstm", "mamba", "mingru")


def round_robin(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each case, the cases called in turn ``reps`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(warmup + reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: RNNLM, window: int) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(VOCAB, (BATCH, window), generator=torch.Generator().manual_seed(window))

    def step() -> None:
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def model_for(case: str, size: str) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=VOCAB, dropout=0.1, **SIZES[size][case]))


def training(reps: int, windows: list[int]) -> list[dict]:
    rows = []
    for size, cells in SIZES.items():
        models = {case: model_for(case, size) for case in cells}
        for window in windows:
            seconds = round_robin({case: train_step(m, window) for case, m in models.items()}, reps)
            for case, s in seconds.items():
                rows.append(
                    {
                        "size": size,
                        "case": case,
                        "window": window,
                        "batch": BATCH,
                        "parameters": models[case].num_parameters(),
                        "step_ms": round(s * 1e3, 1),
                        "tokens_per_s": round(BATCH * window / s),
                        "vs_gru": round(seconds["gru"] / s, 2),
                        **SIZES[size][case],
                    }
                )
            print(
                f"{size} window {window}: "
                + ", ".join(f"{c} {rows[-len(seconds) + k]['tokens_per_s']}" for k, c in enumerate(seconds)),
                flush=True,
            )
    return rows


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
) -> torch.Tensor:
    """Mamba-1's form: per-channel decays, so the scan runs over a (B, T, E·N) tensor.
    x, dt: (B, T, E), a: (E, N), b, c: (B, T, N) -> y (B, T, E)."""
    batch, time_, e = x.shape
    n = b.shape[-1]
    decay = torch.exp(dt[..., None] * a).reshape(batch, time_, e * n)
    drive = ((dt * x)[..., None] * b[:, :, None, :]).reshape(batch, time_, e * n)
    h = LinearScan.apply(decay, drive, torch.zeros(batch, e * n))
    return (h.view(batch, time_, e, n) * c[:, :, None, :]).sum(-1)


def formulations(reps: int, batch: int = BATCH, time_: int = 128, inner: int = 448, n: int = 16) -> dict:
    """The recurrence alone, forward + backward, one layer: inner channels, state size n."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_(True)

    x, b, c = leaf(batch, time_, inner), leaf(batch, time_, n), leaf(batch, time_, n)
    dt = (0.05 * torch.rand(batch, time_, inner, generator=gen) + 0.01).requires_grad_(True)
    heads = 4
    dt_h = dt[..., :heads].detach().clone().requires_grad_(True)
    a_h, a_e = -torch.linspace(1, 16, heads), -torch.linspace(1, 16, n).expand(inner, n)
    h0 = torch.zeros(batch, heads, inner // heads, n)
    projected, g0 = leaf(batch, time_, 2 * inner), torch.zeros(batch, inner)  # [gate | candidate]
    cases = {
        "mamba2_ssd_chunk64": lambda: (
            ssd(x.view(batch, time_, heads, -1), dt_h, a_h, b, c, h0, 64)[0].sum().backward()
        ),
        "mamba1_selective_scan": lambda: selective_scan(x, dt, a_e, b, c).sum().backward(),
        "mingru_blocked_scan": lambda: scan_blocked(projected, g0).sum().backward(),
        "mingru_log_space_scan": lambda: scan_log(*projected.chunk(2, dim=-1), g0).sum().backward(),
    }
    seconds = round_robin(cases, reps)
    return {
        "batch": batch,
        "time": time_,
        "inner": inner,
        "state_size": n,
        "ssd_heads": heads,
        **{f"{k}_ms": round(v * 1e3, 1) for k, v in seconds.items()},
    }


def decode(reps: int, tmp: Path) -> list[dict]:
    """StatefulDecoder.step of each 0.7 M bundle at batch 1 and 64, round robin over the cells."""
    tokenizer = CharTokenizer(Vocab(["<unk>", *[chr(c) for c in range(32, 32 + VOCAB - 1)]]))
    runtimes = {
        cell: LMRuntime.load(export_lm(model_for(cell, "0.7M").eval(), tokenizer, tmp / cell))
        for cell in DECODE_CELLS
    }
    rows = []
    for batch in (1, 64):
        rng = np.random.default_rng(batch)
        ids = rng.integers(0, VOCAB, batch)
        decoders = {cell: StatefulDecoder(rt, batch=batch) for cell, rt in runtimes.items()}
        feed = ids.tolist() if batch == 1 else ids
        seconds = round_robin(
            {cell: (lambda d=d, f=feed: d.step(f)) for cell, d in decoders.items()},
            reps if batch == 1 else max(50, reps // 8),
            warmup=20,
        )
        for cell, s in seconds.items():
            state_bytes = sum(a.nbytes for a in runtimes[cell].init_state(1))
            rows.append(
                {
                    "cell": cell,
                    "batch": batch,
                    "step_us": round(s * 1e6, 1),
                    "tokens_per_s": round(batch / s),
                    "vs_gru_time": round(s / seconds["gru"], 2),
                    "state_bytes_per_stream": state_bytes,
                }
            )
    return rows


PROFILED = ("gru", "mamba", "mamba bf16", "mingru", "mingru bf16", "mingru e1 bf16")


def profile(window: int = 128, size: str = "0.7M", steps: int = 3) -> dict[str, dict]:
    """Self CPU ms per training step by operator (the top 12) of each PROFILED case, one after another."""
    result = {}
    for case in PROFILED:
        step = train_step(model_for(case, size), window)
        step()  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) / steps / 1e3
        matmul = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        result[case] = {
            "size": size,
            "window": window,
            "step_cpu_ms": round(total, 1),
            "matmul_ms": round(matmul / steps / 1e3, 1),
            "top_ops_ms": {e.key: round(e.self_cpu_time_total / steps / 1e3, 1) for e in ops[:12]},
        }
        print(
            f"profile {case}: {result[case]['step_cpu_ms']} ms, matmul {result[case]['matmul_ms']}",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="training steps timed per case")
    parser.add_argument("--decode-reps", type=int, default=2000)
    parser.add_argument("--result", default="lm_cells", help="result name in bench/results/")
    parser.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="training window lengths")
    args = parser.parse_args(argv)
    result = {
        "threads": torch.get_num_threads(),
        "training": training(args.reps, [int(w) for w in args.windows.split(",")]),
        "formulations": formulations(args.reps),
        "profile": profile(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["decode"] = decode(args.decode_reps, Path(tmp))
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
