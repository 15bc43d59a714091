"""One decode step and prompt prefill: onnxruntime (exported bundle) vs eager torch on the same weights.

2-layer GRU, hidden 256, 80-symbol vocabulary. ``--threads`` lists the thread settings to measure, the
same on both sides; ``default`` leaves both libraries at their own defaults (one intra-op thread per
physical core for onnxruntime, ``torch.get_num_threads()`` for torch: 2 on the 2-core reference machine),
which is the headline comparison; ``1`` pins both to one core. More than one thread is only meaningful on
an otherwise idle machine, as both thread pools spin. Calls are interleaved (ORT, torch, ORT, ...) in the same
process and the medians of many repetitions compared, so machine load affects both sides alike;
"alone" figures time back-to-back calls, as in a decode loop. Each batch measures ``LMRuntime.step`` (state in
and out as numpy arrays) and ``StatefulDecoder.step``, the decode loop's step (the state stays in bound
buffers): the headline is the decoder's. Writes bench/results/export_step.json.

    python -m bench.export_step [--reps 2000] [--cell gru] [--threads default,1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lm.export import export_lm
from lm.model import RNNLM, ModelConfig
from serving.runtime import LMRuntime
from serving.stateful_decoder import StatefulDecoder
from serving.tokenizers import CharTokenizer
from serving.vocab import Vocab

RESULTS = Path(__file__).resolve().parent / "results" / "export_step.json"
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # read before any case changes it


def interleaved(
    a: tuple[str, Callable[[], object]], b: tuple[str, Callable[[], object]], reps: int, warmup: int = 20
) -> dict[str, float]:
    """Median wall time in microseconds of two functions called alternately (a, b, a, b, ...).

    Each call follows a call of the other one, so both pay the same cache eviction (the two hold
    separate copies of the weights, 3 MB each for the default model: more than this CPU's 2 MB L2).
    """
    for _, fn in (a, b):
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {a[0]: [], b[0]: []}
    for _ in range(reps):
        for name, fn in (a, b):
            start = time.perf_counter_ns()
            fn()
            times[name].append((time.perf_counter_ns() - start) / 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def alone(fn: Callable[[], object], reps: int, warmup: int = 20) -> float:
    """Median wall time in microseconds of back-to-back calls (warm caches, as in a busy server)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def build(cell: str, vocab: int, hidden: int, layers: int, out: Path) -> tuple[RNNLM, Path]:
    """A random model and its exported bundle directory."""
    torch.manual_seed(0)
    symbols = [chr(c) for c in range(32, 32 + vocab - 1)]
    tokenizer = CharTokenizer(Vocab(["<unk>", *symbols]))
    model = RNNLM(ModelConfig(vocab_size=vocab, cell=cell, layers=layers, embed=hidden, hidden=hidden)).eval()
    return model, export_lm(model, tokenizer, out)


def threads_case(model: RNNLM, bundle: Path, threads: str, reps: int) -> dict:
    """The decode step at batch 1 and 64 with ``threads`` (a count, or "default") on both sides."""
    torch.set_num_threads(TORCH_DEFAULT_THREADS if threads == "default" else int(threads))
    ort_threads = 0 if threads == "default" else int(threads)  # 0: onnxruntime's own default
    runtime = LMRuntime.load(bundle, threads=ort_threads)
    return {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": ort_threads or "default (one per physical core)",
        "step": [step_case(model, runtime, 1, reps), step_case(model, runtime, 64, max(50, reps // 8))],
    }


def step_case(model: RNNLM, runtime: LMRuntime, batch: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, runtime.vocab_size, (batch, 1), dtype=np.int64)
    state = [rng.standard_normal(s.shape).astype(np.float32) for s in runtime.init_state(batch)]
    feed = {"tokens": tokens, **dict(zip(runtime.state_names, state, strict=True))}
    t_tokens, t_state = torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state)

    def torch_step() -> None:
        with torch.inference_mode():
            model(t_tokens, t_state)

    ort_step = lambda: runtime.step(tokens, state)  # noqa: E731
    decoder, ids = StatefulDecoder(runtime, state), tokens[:, 0].tolist() if batch == 1 else tokens[:, 0]
    medians = interleaved(("ort_step_us", ort_step), ("torch_eager_us", torch_step), reps)
    warm = {
        "ort_step_alone_us": alone(ort_step, reps),
        "ort_decoder_step_alone_us": alone(lambda: decoder.step(ids), reps),
        "ort_session_run_alone_us": alone(lambda: runtime.session.run(None, feed), reps),
        "torch_eager_alone_us": alone(torch_step, reps),
    }
    torch_alone = warm["torch_eager_alone_us"]
    return {
        "batch": batch,
        "reps": reps,
        **{k: round(v, 1) for k, v in (medians | warm).items()},
        "ratio_ort_to_torch_interleaved": round(medians["ort_step_us"] / medians["torch_eager_us"], 3),
        "ratio_ort_to_torch_alone": round(warm["ort_step_alone_us"] / torch_alone, 3),
        "ratio_decoder_to_torch_alone": round(warm["ort_decoder_step_alone_us"] / torch_alone, 3),
        "ort_tokens_per_s": round(batch / medians["ort_step_us"] * 1e6),
    }


def prefill_case(model: RNNLM, runtime: LMRuntime, length: int, reps: int) -> dict:
    ids = np.random.default_rng(1).integers(0, runtime.vocab_size, length).tolist()
    single = [np.array([[i]], dtype=np.int64) for i in ids]

    def stepwise() -> None:
        state = runtime.init_state(1)
        for token in single:
            _, state = runtime.step(token, state)

    def torch_prefill() -> None:
        with torch.inference_mode():
            model(torch.tensor([ids]))

    one_call = ("ort_one_call_us", lambda: runtime.prefill(ids))
    medians = interleaved(one_call, ("ort_single_steps_us", stepwise), reps, warmup=2)
    medians |= {"torch_one_call_us": interleaved(one_call, ("torch", torch_prefill), reps, warmup=2)["torch"]}
    ratio_steps = medians["ort_single_steps_us"] / medians["ort_one_call_us"]
    ratio_torch = medians["ort_one_call_us"] / medians["torch_one_call_us"]
    return {
        "tokens": length,
        "reps": reps,
        **{k: round(v, 1) for k, v in medians.items()},
        "speedup_one_call_vs_steps": round(ratio_steps, 2),
        "ratio_ort_one_call_to_torch": round(ratio_torch, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="gru", choices=["gru", "lstm", "rnn_tanh", "rnn_relu"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=80)
    parser.add_argument("--reps", type=int, default=2000, help="repetitions of the batch-1 step")
    parser.add_argument(
        "--threads",
        default="default,1",
        help="comma-separated thread settings, the same on both sides: counts or 'default'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, bundle = build(args.cell, args.vocab, args.hidden, args.layers, Path(tmp) / "bundle")
        result = {
            "model": {
                "cell": args.cell,
                "layers": args.layers,
                "hidden": args.hidden,
                "embed": args.hidden,
                "vocab": args.vocab,
            },
            "versions": {
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
            },
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
            "by_threads": [threads_case(model, bundle, t, args.reps) for t in args.threads.split(",")],
        }
        torch.set_num_threads(1)
        result["prefill_threads"] = 1
        result["prefill"] = prefill_case(
            model, LMRuntime.load(bundle, threads=1), 512, max(5, args.reps // 200)
        )
        result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
