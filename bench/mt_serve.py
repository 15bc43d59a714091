"""Translator serving figures, measured side by side in one run -> bench/results/mt_serve.json.

    python -m bench.mt_serve --run runs/mt-fra-eng [--sentences N] [--clients 16]

1. Export the run (``seq2seq.export``), then translate the test split's source sentences (all, or the
   first N):
   torch (``seq2seq.decode``: eager ``decode_step`` under inference_mode) vs onnxruntime
   (``serving.translator``), both through the same search (``serving.search``) and front end
   (``serving.frontend``), same batches of 64 sentences, greedy and beam 4/5, one thread each; plus the
   batch job (``serving.batch_job``, token batches, bundle loading and output fsync included) on the
   same sentences as a file; outputs compared sentence by sentence. Runs are interleaved and the best
   of three is kept (shared machine).
   Then both cores, greedy and beam 4: each runtime with 2 workers (``--workers 2``: two batches at
   once, one thread each) and with 2 intra-op threads, and the batch job with ``--workers 2``.
2. A real ``rnnlab-serve`` process over the bundle (``--translate-workers`` 1, then 2), 16 client
   threads sending Translate calls (1 and 8 sentences per call, beam 4): sentences/s and per-call
   p50/p99 latency, beside the local batch job with as many workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import repo_path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "mt_serve.json"
REPEATS = 3


def split_sentences(train_config: dict, count: int) -> list[str]:
    from seq2seq.data import group_references, load_splits
    from seq2seq.train import TrainConfig

    config = TrainConfig.from_dict(train_config, strict=False)
    groups = group_references(load_splits(config.data_config())["test"], config.src, config.tgt)
    return [g.source for g in (groups[:count] if count else groups)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def local_figures(run, bundle: Path, texts: list[str], source: Path, beams: list[int], work: Path) -> dict:
    from serving.batch_job import JobConfig, run_job
    from serving.search import SearchParams
    from serving.translator import Seq2SeqRuntime

    runtime = Seq2SeqRuntime.load(bundle, threads=1)
    torch_translator = run.translator()
    figures = {}
    for beam in beams:
        label = "greedy" if beam == 1 else f"beam{beam}"
        torch_times, ort_times, job_times = [], [], []
        out = work / f"job.{label}.txt"
        job = JobConfig(input=str(source), output=str(out), bundle=str(bundle), beam=beam, progress=False)
        for _ in range(REPEATS):  # interleaved, best of REPEATS: the machine is shared
            seconds, theirs = timed(lambda b=beam: torch_translator.translate(texts, SearchParams(b), 64))
            torch_times.append(seconds)
            seconds, ours = timed(lambda b=beam: runtime.translate(texts, SearchParams(b), 64))
            ort_times.append(seconds)
            job_times.append(timed(lambda j=job: run_job(j))[0])
        torch_s, ort_s, job_s = min(torch_times), min(ort_times), min(job_times)
        job_lines = out.read_text(encoding="utf-8").split("\n")[:-1]
        figures[label] = {
            "torch_sentences_per_s": round(len(texts) / torch_s, 1),
            "ort_sentences_per_s": round(len(texts) / ort_s, 1),
            "ort_over_torch": round(torch_s / ort_s, 2),
            "batch_job_sentences_per_s": round(len(texts) / job_s, 1),
            "identical_to_torch": sum(a.text == b.text for a, b in zip(ours, theirs, strict=True)),
            "batch_job_identical_to_torch": sum(a == b.text for a, b in zip(job_lines, theirs, strict=True)),
            "mean_output_tokens": round(float(np.mean([len(t.hypotheses[0].tokens) for t in ours
                                                       if t.hypotheses])), 1),
        }
        print(f"{label}: {figures[label]}", file=sys.stderr)
    return figures


def two_core_figures(run, bundle: Path, texts: list[str], source: Path, beams: list[int], work: Path,
                     ) -> dict:
    """Both cores: each runtime with 2 workers of 1 thread and with 1 worker of 2 intra-op threads;
    the batch job with --workers 2. The ratio divides by torch's better configuration."""
    import torch

    from serving.batch_job import JobConfig, run_job
    from serving.search import SearchParams
    from serving.translator import Seq2SeqRuntime

    one_thread, two_threads = Seq2SeqRuntime.load(bundle, threads=1), Seq2SeqRuntime.load(bundle, threads=2)
    torch_translator = run.translator()
    figures = {}
    for beam in beams:
        label = "greedy" if beam == 1 else f"beam{beam}"
        params = SearchParams(beam)
        job = JobConfig(input=str(source), output=str(work / f"job2.{label}.txt"), bundle=str(bundle),
                        beam=beam, workers=2, progress=False)

        def torch_threads(count: int, workers: int, params: SearchParams = params):
            torch.set_num_threads(count)
            try:
                return torch_translator.translate(texts, params, 64, workers=workers)
            finally:
                torch.set_num_threads(1)

        cases = {"torch_2_workers": lambda: torch_threads(1, 2),
                 "torch_2_threads": lambda: torch_threads(2, 1),
                 "ort_2_workers": lambda p=params: one_thread.translate(texts, p, 64, workers=2),
                 "ort_2_threads": lambda p=params: two_threads.translate(texts, p, 64),
                 "batch_job_2_workers": lambda j=job: run_job(j)}
        times: dict[str, list[float]] = {name: [] for name in cases}
        outputs: dict[str, object] = {}
        for _ in range(REPEATS):
            for name, case in cases.items():
                seconds, outputs[name] = timed(case)
                times[name].append(seconds)
        rates = {name: round(len(texts) / min(values), 1) for name, values in times.items()}
        best_torch = max(rates["torch_2_workers"], rates["torch_2_threads"])
        reference = [t.text for t in outputs["torch_2_threads"]]
        job_lines = Path(job.output).read_text(encoding="utf-8").split("\n")[:-1]
        figures[label] = {
            **{f"{name}_sentences_per_s": rate for name, rate in rates.items()},
            "ort_2_workers_over_best_torch": round(rates["ort_2_workers"] / best_torch, 2),
            "ort_2_workers_over_torch_2_workers": round(rates["ort_2_workers"] / rates["torch_2_workers"], 2),
            "identical_to_torch": min(
                sum(a.text == b for a, b in zip(outputs[name], reference, strict=True))
                for name in ("torch_2_workers", "ort_2_workers", "ort_2_threads")),
            "batch_job_identical_to_torch": sum(a == b for a, b in zip(job_lines, reference, strict=True)),
        }
        print(f"two cores, {label}: {figures[label]}", file=sys.stderr)
    return figures


def start_server(models: Path, translate_workers: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "serving.server", "--models", str(models), "--port", "0",
                               "--translate-workers", str(translate_workers), "--log-level", "WARNING"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "listening on" not in line:
        server.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return server, line.strip().rsplit(" ", 1)[-1]


def grpc_figures(target: str, model: str, texts: list[str], clients: int, per_call: int, beam: int) -> dict:
    from serving.client import Client

    calls = [texts[i:i + per_call] for i in range(0, len(texts), per_call)]
    latencies: list[float] = []
    lock = threading.Lock()
    next_call = iter(range(len(calls)))

    def worker() -> None:
        with Client(target, timeout=300) as client:
            while True:
                with lock:
                    index = next(next_call, None)
                if index is None:
                    return
                start = time.perf_counter()
                client.translate(model, calls[index], beam=beam)
                with lock:
                    latencies.append(time.perf_counter() - start)

    with Client(target) as warm:
        warm.translate(model, texts[:4], beam=beam)
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "sentences_per_call": per_call, "beam": beam, "calls": len(calls),
            "sentences_per_s": round(len(texts) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def ensure_run(run_dir: Path, which: str, minutes: float, work: Path) -> Path:
    """``run_dir``, or (no checkpoint there) a default-config run trained for ``minutes`` under ``work``."""
    if (run_dir / f"{which}.pt").is_file():
        return run_dir
    print(f"{run_dir}: no {which}.pt; training a default-config translator for {minutes:g} minutes",
          file=sys.stderr)
    out = work / "run"
    subprocess.run([sys.executable, "-m", "seq2seq.cli", "train", "--out", str(out), "--max-minutes",
                    str(minutes), "--threads", "1", "--no-progress"], cwd=ROOT, check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "mt-fra-eng"), help="trained translation run")
    parser.add_argument("--which", choices=("best", "last"), default="best")
    parser.add_argument("--sentences", type=int, default=0,
                        help="translate the first N test-split sentences (default 0: all of them)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--train-minutes", type=float, default=3.0,
                        help="without a checkpoint in --run: train a default-config model this long first")
    args = parser.parse_args(argv)

    import torch

    from seq2seq.export import export_run
    from seq2seq.run import load_run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mt-serve-bench-") as tmp:
        work = Path(tmp)
        run_dir = ensure_run(Path(args.run), args.which, args.train_minutes, work)
        run = load_run(run_dir, args.which)
        texts = split_sentences(run.train_config, args.sentences)
        bundle = export_run(run_dir, work / "models" / "mt", which=args.which, sample=32)
        source = work / "test.src.txt"  # the batch job's input
        source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        local = local_figures(run, bundle, texts, source, [1, 4, 5], work)
        two_cores = two_core_figures(run, bundle, texts, source, [1, 4], work)
        remote = []
        for workers in (1, 2):
            server, target = start_server(work / "models", workers)
            try:
                for per_call in (1, 8):
                    figures = grpc_figures(target, "mt", texts, args.clients, per_call, 4)
                    remote.append({"translate_workers": workers, **figures})
            finally:
                server.terminate()
                server.wait(timeout=30)
    for figures in remote:
        job = (local["beam4"]["batch_job_sentences_per_s"] if figures["translate_workers"] == 1
               else two_cores["beam4"]["batch_job_2_workers_sentences_per_s"])
        figures["vs_local_batch_job_same_workers"] = round(figures["sentences_per_s"] / job, 2)
        print(f"grpc: {figures}", file=sys.stderr)
    config = run.model_config.to_dict()
    trained_here = f"{args.run} missing: a {args.train_minutes:g}-minute model trained by this bench"
    result = {
        "run": repo_path(args.run) if run_dir == Path(args.run) else trained_here, "checkpoint": args.which,
        "sentences": len(texts), "split": "test",
        "model": {k: config[k] for k in ("embed", "enc_hidden", "dec_hidden", "layers", "bidirectional",
                                         "attention", "src_vocab", "tgt_vocab")},
        "evaluation": run.evaluation, "threads": 1, "batch_size": 64,
        "timing": f"best of {REPEATS}, interleaved",
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "local": local, "two_cores": two_cores, "grpc": remote,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
