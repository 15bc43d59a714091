"""ForecastStream under load: many concurrent live streams on one server process; throughput and memory.

    python -m bench.ts_serve [--streams 1000] [--messages 40] [--bundle DIR]

The model (unless ``--bundle``): a GRU forecaster (hidden 32) trained on Mauna Loa co2 (the preset's
window, horizon 8) for ``--train-steps`` steps by ``rnnlab-ts train``, exported by ``rnnlab-ts export``.
The server is ``python -m serving.server`` in a process of its own (one ORT thread), so that its resident
memory is its own; the streams come from this process (grpc.aio, over 8 channels) on the same 2 cores.

For the server with batching on, then with ``--no-batching`` (one stream per ORT call), side by side:
1. idle: the server after one Forecast call (RSS);
2. live: ``--streams`` ForecastStream calls opened at once, each reading a window-long history of its own
   in its first message and waiting with its state on the server (RSS: memory per stream = (live - idle) /
   streams);
3. load: every stream sends ``--messages`` messages of one observation each, awaiting each answer (a
   closed loop, all streams at once): observations answered per second, the latency of an answer, the
   server's CPU time per observation, and its ORT calls (rnnlab_forecast_batch_streams) against the
   observations read.
Writes bench/results/ts_serve.json. Target (issue 16): 1,000 live streams under 100 MB over idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from bench import ROOT, repo_path
from bench.serve_load import ServerProcess
from bench.soak import free_port
from serving.api.rnnlab.v1 import forecasting_pb2 as fpb
from serving.api.rnnlab.v1 import forecasting_pb2_grpc as fpb_grpc
from serving.client import observations
from serving.forecast_runtime import ForecastRuntime

RESULTS = ROOT / "bench" / "results" / "ts_serve.json"
CHANNELS = 8
TARGET_BYTES = 100 * 2**20


def make_bundle(work: Path, steps: int) -> Path:
    """A co2 GRU run of ``steps`` steps (seeded), exported -> the bundle (a models dir of its own)."""
    from forecast.cli import main

    run, bundle = work / "run", work / "models" / "co2-gru"
    flags = f"--dataset co2 --model gru --hidden 32 --horizon 8 --max-steps {steps} --seed 0 --no-progress"
    if main(["train", *flags.split(), "--out", str(run)]) != 0 or main(
        ["export", str(run), "--out", str(bundle)]
    ):
        raise SystemExit("training or export failed")
    return bundle


def histories(runtime: ForecastRuntime, streams: int, length: int) -> list[np.ndarray]:
    """Stream k reads the series' window ending k steps before its end, then ``length`` more values."""
    from forecast.data import load_series

    values = load_series("co2").values
    w = runtime.window
    starts = [len(values) - w - length - (k % (len(values) - w - length)) for k in range(streams)]
    return [values[s : s + w + length] for s in starts]


def metric(metrics_port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


class Streams:
    """``count`` open ForecastStream calls; ``open`` reads each one's history, ``load`` runs the loop."""

    def __init__(self, target: str, runtime: ForecastRuntime, series: list[np.ndarray]) -> None:
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
        self.stubs = [fpb_grpc.ForecastingStub(c) for c in self.channels]
        self.model, self.series = runtime.manifest.name, series
        self.window, self.horizon = runtime.window, runtime.horizon
        self.calls: list = []
        self.latencies: list[float] = []

    async def open(self) -> None:
        async def one(k: int):
            call = self.stubs[k % CHANNELS].ForecastStream()
            history = observations(self.series[k][: self.window].tolist())
            await call.write(fpb.ForecastStreamRequest(model=self.model, observations=history))
            reply = await call.read()
            assert reply.observations == self.window and len(reply.steps) == self.horizon, reply
            return call

        self.calls = await asyncio.gather(*(one(k) for k in range(len(self.series))))

    async def load(self, messages: int) -> float:
        """Every stream sends ``messages`` one-observation messages, one at a time -> seconds taken."""

        async def one(k: int) -> None:
            call = self.calls[k]
            for value in self.series[k][self.window : self.window + messages]:
                sent = time.perf_counter()
                await call.write(fpb.ForecastStreamRequest(observations=observations([value.tolist()])))
                reply = await call.read()
                self.latencies.append(time.perf_counter() - sent)
                assert len(reply.steps) == self.horizon

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(len(self.calls))))
        return time.perf_counter() - start

    async def close(self) -> None:
        for call in self.calls:
            await call.done_writing()
        for call in self.calls:
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        for channel in self.channels:
            await channel.close()


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time of the server process so far."""
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle_rss(server: ServerProcess, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return server.rss()


async def run_server(bundle: Path, series: list[np.ndarray], messages: int, *flags: str) -> dict:
    """One server process: idle, live and load phases (see the module doc) -> its figures."""
    runtime = ForecastRuntime.load(bundle)
    metrics_port = free_port()
    server = ServerProcess(
        bundle.parent, "--metrics-port", str(metrics_port), "--max-sessions", "100000", *flags
    )
    rss: dict[str, int] = {}
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            history = observations(series[0][: runtime.window].tolist())
            await fpb_grpc.ForecastingStub(channel).Forecast(
                fpb.ForecastRequest(model=runtime.manifest.name, history=history)
            )
        rss["idle"] = settle_rss(server)
        streams = Streams(server.target, runtime, series)
        start = time.perf_counter()
        await streams.open()
        opened_s = time.perf_counter() - start
        rss["live"] = settle_rss(server)
        calls0, cpu0 = metric(metrics_port, "rnnlab_forecast_batch_streams_count"), cpu_seconds(server)
        seconds = await streams.load(messages)
        cpu = cpu_seconds(server) - cpu0
        calls = metric(metrics_port, "rnnlab_forecast_batch_streams_count") - calls0
        rss["after_load"] = settle_rss(server)
        await streams.close()
        rss["after_close"] = settle_rss(server)
    finally:
        server.stop()
    load = {"seconds": seconds, "cpu": cpu, "calls": calls, "latencies": streams.latencies}
    return {"flags": list(flags), **_figures(rss, len(series), messages, opened_s, load)}


def _figures(rss: dict[str, int], streams: int, messages: int, opened_s: float, load: dict) -> dict:
    answered, seconds, calls = streams * messages, load["seconds"], load["calls"]
    lat = np.array(load["latencies"]) * 1000
    return {
        "idle_rss_mb": round(rss["idle"] / 2**20, 1),
        "live_rss_mb": round(rss["live"] / 2**20, 1),
        "live_over_idle_mb": round((rss["live"] - rss["idle"]) / 2**20, 1),
        "bytes_per_stream": round((rss["live"] - rss["idle"]) / streams),
        "rss_after_load_mb": round(rss["after_load"] / 2**20, 1),
        "rss_after_close_mb": round(rss["after_close"] / 2**20, 1),
        "open_seconds": round(opened_s, 2),
        "observations": answered,
        "seconds": round(seconds, 2),
        "observations_per_s": round(answered / seconds),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
        },
        "server_cpu_us_per_observation": round(load["cpu"] / answered * 1e6, 1),
        "ort_calls": int(calls),
        "streams_per_ort_call": round(answered / calls, 1) if calls else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=40, help="one-observation messages per stream")
    parser.add_argument(
        "--bundle", type=Path, help="a one-column forecast bundle, fed co2 (default: train and export co2)"
    )
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ts-serve-"))
    try:
        bundle = args.bundle or make_bundle(work, args.train_steps)
        runtime = ForecastRuntime.load(bundle)
        series = histories(runtime, args.streams, args.messages)
        runs = {
            "batched": asyncio.run(run_server(bundle, series, args.messages)),
            "unbatched": asyncio.run(run_server(bundle, series, args.messages, "--no-batching")),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    batched = runs["batched"]
    results = {
        "benchmark": "ForecastStream: live streams, throughput and memory per stream (bench/ts_serve.py)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "bundle": repo_path(bundle) if args.bundle else f"co2 GRU, {args.train_steps} training steps, seed 0",
        "architecture": runtime.manifest.architecture,
        "state_bytes_per_stream": runtime.state_bytes,
        "streams": args.streams,
        "messages_per_stream": args.messages,
        "server": "python -m serving.server, own process, 1 ORT thread; clients in the bench process",
        **runs,
        "batched_over_unbatched_throughput": round(
            batched["observations_per_s"] / runs["unbatched"]["observations_per_s"], 2
        ),
        "target": {
            "live_streams_over_idle_mb_max": TARGET_BYTES / 2**20,
            "met": batched["live_over_idle_mb"] < TARGET_BYTES / 2**20,
        },
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
