"""Load benchmark of rnnlab-serve: concurrent streams, batched vs unbatched, against the ORT ceiling.

    python -m bench.serve_load [--bundle DIR] [--streams 1,8,64,256] [--tokens 256] [--repeats 7]
                               [--sessions 10000]

For each stream count N, N concurrent streams of ``--tokens`` tokens each (temperature 1, seeded, no stop:
the length is fixed) run against a server process; the client load runs in this process (asyncio,
grpc.aio), the server in another. Reported side by side in the same run:
- ``ceiling``: onnxruntime alone stepping a batch of N in a loop (the same bundle, 1 thread);
- ``batched``: the server with continuous batching; ``unbatched``: the server with ``--no-batching``;
- ``batched_no_prompt_cache``: batching with ``--prompt-cache-entries 0``. Every stream sends the same
  prompt, so the default server reads it once and later streams start from its cached state (as clients
  sharing a system prompt would); this row shows what reading every prompt costs.
A 64-stream run lasts about a quarter of a second, so each figure is the median of ``--repeats`` runs,
ceiling and servers taking turns (the unbatched server, seconds per run, runs once); every run's figure is
kept in the JSON. Then the server's RSS with ``--sessions`` idle sessions open, against the same server empty.
The bundle is ``--bundle``, else the default pipeline's (``bundles/lm-timemachine``, from ``make export``),
else a 2-layer GRU (hidden 256, 80-symbol character vocabulary) with random weights, exported first (needs
torch): the same shapes, so the same speed. Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench import repo_path
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.runtime import LMRuntime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve_load.json"
DEFAULT_BUNDLE = ROOT / "bundles" / "lm-timemachine"
PROMPT = "The Time Traveller "


def random_bundle(out_dir: Path, cell: str | None = None) -> tuple[Path, str]:
    """A random-weight bundle and its description: without ``cell`` a 2-layer GRU (hidden 256, 80-symbol
    char vocabulary); with it, that cell at bench.lm_cells' 0.7 M size (the figures of docs/lm.md)."""
    import torch

    from bench.lm_cells import VOCAB, model_for
    from lm.export import export_lm
    from lm.model import RNNLM, ModelConfig
    from serving.tokenizers import CharTokenizer

    torch.manual_seed(0)
    symbols = "".join(chr(c) for c in range(32, 32 + (VOCAB - 1 if cell else 79)))  # + <unk>
    tokenizer = CharTokenizer.train(symbols)
    if cell:
        model = model_for(cell, "0.7M").eval()
        return export_lm(model, tokenizer, out_dir / f"bench-{cell}", name=f"bench-{cell}"), (
            f"random {cell} of bench.lm_cells' 0.7M size, vocab {VOCAB}"
        )
    model = RNNLM(
        ModelConfig(vocab_size=tokenizer.vocab_size, cell="gru", layers=2, embed=128, hidden=256, dropout=0.0)
    ).eval()
    bundle = export_lm(model, tokenizer, out_dir / "bench-gru", name="bench-gru")
    return bundle, "random 2-layer GRU hidden 256, vocab 80"


def choose_bundle(given: str | None, cell: str | None, tmp: Path) -> tuple[Path, str]:
    """``given``, else a ``random_bundle`` of ``cell``, else the default pipeline's bundle, else the random
    GRU made in ``tmp``; with how the result file names it."""
    if given or (not cell and DEFAULT_BUNDLE.is_dir()):
        bundle = Path(given or DEFAULT_BUNDLE)
        return bundle, repo_path(bundle)
    return random_bundle(tmp, cell)


def ceiling(runtime: LMRuntime, batch: int, steps: int) -> float:
    """Tokens/s of ORT alone stepping a (batch, 1) input with the state carried."""
    state = runtime.init_state(batch)
    tokens = np.ones((batch, 1), np.int64)
    runtime.step(tokens, state)
    start = time.perf_counter()
    for _ in range(steps):
        _, state = runtime.step(tokens, state)
    return batch * steps / (time.perf_counter() - start)


class ServerProcess:
    """``python -m serving.server`` on a free port; ``rss()`` reads its resident memory."""

    def __init__(self, bundle: Path, *flags: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RNNLAB_STATE_KEY": "bench"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.server",
                "--models",
                str(bundle),
                "--port",
                "0",
                "--max-streams",
                "2048",
                "--log-level",
                "WARNING",
                *flags,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        self.target = line.split()[-1]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def one_stream(stub: pb_grpc.GenerationStub, model: str, tokens: int, seed: int) -> dict:
    request = pb.GenerateRequest(
        model=model, prompt=PROMPT, max_tokens=tokens, sampling=pb.SamplingOptions(temperature=1.0, seed=seed)
    )
    start = time.perf_counter()
    first, last, gaps, count = None, start, [], 0
    async for message in stub.Generate(request):
        now = time.perf_counter()
        if message.token_ids:
            if first is None:
                first = now
            else:  # a message carries every token produced since the previous one: spread the gap
                gaps += [(now - last) / len(message.token_ids)] * len(message.token_ids)
            last = now
            count += len(message.token_ids)
    return {"start": start, "first": first, "end": time.perf_counter(), "tokens": count, "gaps": gaps}


async def load(target: str, model: str, streams: int, tokens: int, options: tuple = ()) -> dict:
    """``streams`` concurrent streams over one channel (``options``: its channel arguments)."""
    async with grpc.aio.insecure_channel(target, options) as channel:
        stub = pb_grpc.GenerationStub(channel)
        await one_stream(stub, model, 4, 0)  # warm-up: connection, first call
        results = await asyncio.gather(*(one_stream(stub, model, tokens, seed) for seed in range(streams)))
    total = sum(r["tokens"] for r in results)
    if total != streams * tokens:
        raise RuntimeError(f"expected {streams * tokens} tokens, got {total}")
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = np.array([r["first"] - r["start"] for r in results]) * 1000
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1000
    return {
        "tokens_per_s": round(total / elapsed, 1),
        "seconds": round(elapsed, 3),
        "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 3),
        "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 3),
        "inter_token_ms_p50": round(float(np.percentile(gaps, 50)), 4),
        "inter_token_ms_p99": round(float(np.percentile(gaps, 99)), 4),
    }


def _letters(number: int) -> str:
    """``number`` spelt in letters ("0" -> "a"): distinct token ids even in a vocabulary without digits."""
    return str(number).translate(str.maketrans("0123456789", "abcdefghij"))


async def open_sessions(target: str, model: str, count: int, concurrency: int = 64) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionsStub(channel)
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:  # distinct prompts: every session holds a state of its own, none from the cache
                await stub.Open(pb.OpenSessionRequest(model=model, prompt=PROMPT + _letters(i)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(
    runtime: LMRuntime, servers: dict[str, ServerProcess], model: str, streams: int, tokens: int, repeats: int
) -> dict:
    """Ceiling, batched and unbatched figures for ``streams`` concurrent streams, taking turns."""
    ceilings, runs = [], {mode: [] for mode in servers}
    for repeat in range(repeats):
        ceilings.append(ceiling(runtime, streams, max(256, 16384 // streams)))
        for mode, server in servers.items():
            if mode == "unbatched" and repeat > 0:
                continue
            runs[mode].append(asyncio.run(load(server.target, model, streams, tokens)))
            print(f"{mode:9s} {streams:4d} streams: {runs[mode][-1]}", file=sys.stderr)
    row: dict = {
        "ceiling_tokens_per_s": round(statistics.median(ceilings), 1),
        "ceiling_runs": [round(c, 1) for c in ceilings],
    }
    for mode, figures in runs.items():
        ranked = sorted(figures, key=lambda f: f["tokens_per_s"])
        row[mode] = {**ranked[len(ranked) // 2], "runs_tokens_per_s": [f["tokens_per_s"] for f in figures]}
    row["batched_vs_ceiling"] = round(row["batched"]["tokens_per_s"] / row["ceiling_tokens_per_s"], 3)
    row["batched_no_prompt_cache_vs_ceiling"] = round(
        row["batched_no_prompt_cache"]["tokens_per_s"] / row["ceiling_tokens_per_s"], 3
    )
    row["batched_vs_unbatched"] = round(row["batched"]["tokens_per_s"] / row["unbatched"]["tokens_per_s"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle",
        help="LM bundle directory (default: bundles/lm-timemachine if it exists, "
        "else a random-weight 2x256 GRU)",
    )
    parser.add_argument(
        "--cell",
        choices=("gru", "lstm", "mamba", "mingru"),
        help="without --bundle: a random-weight bundle of this cell, bench.lm_cells' 0.7M size (torch)",
    )
    parser.add_argument("--streams", default="1,8,64,256")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="runs per figure (median reported)")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bundle, described = choose_bundle(args.bundle, args.cell, Path(tmp))
        runtime = LMRuntime.load(bundle)
        model = runtime.manifest.name
        results: dict = {
            "bundle": described,
            "architecture": runtime.manifest.architecture,
            "tokens_per_stream": args.tokens,
            "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "streams": {},
        }
        # The servers stay up (idle ones sleep), so that each stream count is measured every way
        # back to back: the machine's load drifts less between them.
        servers = {
            "batched": ServerProcess(bundle),
            "unbatched": ServerProcess(bundle, "--no-batching"),
            "batched_no_prompt_cache": ServerProcess(bundle, "--prompt-cache-entries", "0"),
        }
        try:
            for n in counts:
                results["streams"][str(n)] = measure(runtime, servers, model, n, args.tokens, args.repeats)
        finally:
            for server in servers.values():
                server.stop()
        if args.sessions:
            server = ServerProcess(bundle)
            try:
                asyncio.run(load(server.target, model, 8, 16))
                empty = server.rss()
                start = time.perf_counter()
                asyncio.run(open_sessions(server.target, model, args.sessions))
                opened = time.perf_counter() - start
                full = server.rss()
            finally:
                server.stop()
            results["memory"] = {
                "sessions": args.sessions,
                "rss_empty_mb": round(empty / 2**20, 1),
                "rss_with_sessions_mb": round(full / 2**20, 1),
                "extra_mb": round((full - empty) / 2**20, 1),
                "bytes_per_session": round((full - empty) / args.sessions),
                "open_seconds": round(opened, 2),
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
