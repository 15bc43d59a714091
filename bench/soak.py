"""Soak test of rnnlab-serve under hostile load: bounded in time and count, loopback only.

    python -m bench.soak [--streams 128] [--seconds 300] [--lm DIR] [--translator DIR]

A server process (``python -m serving.server`` on 127.0.0.1, a free port, metrics on) serves one language
model and one translator (default: the committed test bundles tests/bundles/tiny and tiny-mt). For
``--seconds`` this process keeps ``--streams`` Generate streams running (random lengths; ``--cancel`` of
them cancelled after a few messages, ``--short-deadline`` of them given a deadline of 5-50 ms), plus
session workers (open, append, generate, export, resume, CloseSession) and translation workers
(Translate of a few sentences). It reports every ``--every`` seconds the streams done, tokens/s and the
server's RSS, and at the end: the status codes the clients saw by method, the server's
``rnnlab_requests_total`` against them, tokens/s, RSS after the warm-up and its growth. It fails (exit 1)
when any call ends UNKNOWN or INTERNAL (client- or server-side) or a completed stream's token count
differs from what its end message says. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench import ROOT, repo_path
from bench.serve_load import ServerProcess
from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.api.rnnlab.v1 import translation_pb2_grpc as tpb_grpc
from serving.bundle import load_manifest

RESULTS = ROOT / "bench" / "results" / "soak.json"
PROMPTS = ("The Time Traveller ", "It was ", "Hello", "A")
SENTENCES = ("Hello.", "How are you?", "I like the sea.", "The cat is black.")
UNEXPECTED = ("UNKNOWN", "INTERNAL")
LABELS = {  # client method -> the server's rnnlab_requests label
    "Generate": "GenerationService.Generate",
    "Open": "SessionService.Open",
    "Append": "SessionService.Append",
    "SessionGenerate": "SessionService.Generate",
    "Export": "SessionService.Export",
    "Resume": "SessionService.Resume",
    "CloseSession": "SessionService.CloseSession",
    "Translate": "TranslationService.Translate",
}


@dataclass
class Tally:
    """What the clients saw."""

    codes: Counter = field(default_factory=Counter)  # (method, code name) -> calls
    streams: int = 0
    tokens: int = 0
    wrong_counts: int = 0

    def saw(self, method: str, code: grpc.StatusCode) -> None:
        self.codes[(method, code.name)] += 1


@dataclass
class Plan:
    lm: str
    translator: str
    cancel: float
    short_deadline: float
    max_tokens: int


async def stream_worker(stub: pb_grpc.GenerationStub, plan: Plan, tally: Tally, until: float, rng) -> None:
    while time.monotonic() < until:
        tokens = rng.randint(8, plan.max_tokens)
        request = pb.GenerateRequest(
            model=plan.lm,
            prompt=rng.choice(PROMPTS),
            max_tokens=tokens,
            sampling=pb.SamplingOptions(temperature=1.0, seed=rng.randrange(2**32)),
        )
        roll = rng.random()
        timeout = rng.uniform(0.005, 0.05) if roll < plan.short_deadline else 60.0
        cancel_after = rng.randint(1, 4) if roll > 1 - plan.cancel else None
        call = stub.Generate(request, timeout=timeout)
        received, end = 0, None
        try:
            async for message in call:
                received += len(message.token_ids)
                if message.HasField("end"):
                    end = message.end
                if cancel_after is not None and (cancel_after := cancel_after - 1) == 0:
                    call.cancel()
            tally.saw("Generate", grpc.StatusCode.OK)
            tally.streams += 1
            tally.tokens += received
            tally.wrong_counts += end is None or end.generated_tokens != received
        except asyncio.CancelledError:
            if cancel_after != 0:  # not our own cancel: this task is being cancelled
                raise
            tally.saw("Generate", grpc.StatusCode.CANCELLED)
        except grpc.aio.AioRpcError as exc:
            tally.saw("Generate", exc.code())


async def _call(tally: Tally, method: str, coroutine) -> object | None:
    try:
        reply = await coroutine
    except grpc.aio.AioRpcError as exc:
        tally.saw(method, exc.code())
        return None
    tally.saw(method, grpc.StatusCode.OK)
    return reply


async def session_worker(stub: pb_grpc.SessionsStub, plan: Plan, tally: Tally, until: float, rng) -> None:
    while time.monotonic() < until:
        info = await _call(tally, "Open", stub.Open(pb.OpenSessionRequest(model=plan.lm, prompt="Hello")))
        if info is None:
            continue
        sid = info.session_id
        await _call(tally, "Append", stub.Append(pb.AppendRequest(session_id=sid, text=" there")))
        generation = stub.Generate(pb.SessionGenerateRequest(session_id=sid, max_tokens=rng.randint(4, 32)))
        await _call(tally, "SessionGenerate", _drain(generation))
        token = await _call(tally, "Export", stub.Export(pb.ExportSessionRequest(session_id=sid)))
        if token is not None:
            resumed = await _call(tally, "Resume", stub.Resume(pb.ResumeSessionRequest(token=token.token)))
            if resumed is not None:
                close = stub.CloseSession(pb.CloseSessionRequest(session_id=resumed.session_id))
                await _call(tally, "CloseSession", close)
        await _call(tally, "CloseSession", stub.CloseSession(pb.CloseSessionRequest(session_id=sid)))


async def _drain(call) -> None:
    async for _ in call:
        pass


async def translate_worker(
    stub: tpb_grpc.TranslationStub, plan: Plan, tally: Tally, until: float, rng
) -> None:
    while time.monotonic() < until:
        sentences = rng.sample(SENTENCES, rng.randint(1, len(SENTENCES)))
        request = tpb.TranslateRequest(model=plan.translator, sentences=sentences)
        await _call(tally, "Translate", stub.Translate(request, timeout=60))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def server_counts(metrics_port: int) -> Counter:
    """rnnlab_requests_total by (method label, code) from the server's /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: Counter = Counter()
    for line in body.splitlines():
        if line.startswith("rnnlab_requests_total{"):
            labels, value = line[len("rnnlab_requests_total{") :].rsplit("} ", 1)
            pairs = dict(part.split("=", 1) for part in labels.split(","))
            counts[(pairs["method"].strip('"'), pairs["code"].strip('"'))] += int(float(value))
    return counts


async def monitor(pid: int, tally: Tally, started: float, until: float, every: float, samples: list) -> None:
    last_tokens, last_time = 0, started
    while (now := time.monotonic()) < until:
        await asyncio.sleep(min(every, max(0.0, until - now)))
        now = time.monotonic()
        rate = (tally.tokens - last_tokens) / max(now - last_time, 1e-9)
        last_tokens, last_time = tally.tokens, now
        sample = {
            "t": round(now - started, 1),
            "streams": tally.streams,
            "tokens_per_s": round(rate),
            "rss_mb": round(rss_mb(pid), 1),
        }
        samples.append(sample)
        print(json.dumps(sample), flush=True)


async def soak(target: str, pid: int, plan: Plan, args: argparse.Namespace) -> tuple[Tally, list, float]:
    tally, samples, rng = Tally(), [], random.Random(args.seed)
    started = time.monotonic()
    until = started + args.seconds
    async with grpc.aio.insecure_channel(target) as channel:
        generation, sessions = pb_grpc.GenerationStub(channel), pb_grpc.SessionsStub(channel)
        translation = tpb_grpc.TranslationStub(channel)
        workers = [
            stream_worker(generation, plan, tally, until, random.Random(rng.random()))
            for _ in range(args.streams)
        ]
        workers += [
            session_worker(sessions, plan, tally, until, random.Random(rng.random()))
            for _ in range(args.session_workers)
        ]
        workers += [
            translate_worker(translation, plan, tally, until, random.Random(rng.random()))
            for _ in range(args.translate_workers)
        ]
        await asyncio.gather(monitor(pid, tally, started, until, args.every, samples), *workers)
    return tally, samples, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compare(client: Counter, server: Counter) -> list[dict]:
    """Per (method, code): what the clients saw and what the server counted."""
    rows = []
    for method, label in LABELS.items():
        codes = {code for (m, code) in client if m == method} | {code for (m, code) in server if m == label}
        rows += [
            {
                "method": label,
                "code": code,
                "clients": client[(method, code)],
                "server": server[(label, code)],
            }
            for code in sorted(codes)
        ]
    return rows


def summarise(args, plan, tally, samples, elapsed, server, rows) -> dict:
    warm = [s["rss_mb"] for s in samples if s["t"] >= args.warmup] or [s["rss_mb"] for s in samples]
    unexpected = {f"{m} {c}": n for (m, c), n in (tally.codes + server).items() if c in UNEXPECTED}
    return {
        "benchmark": "soak",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "lm": repo_path(args.lm),
        "translator": repo_path(args.translator),
        "streams": args.streams,
        "seconds": round(elapsed, 1),
        "cancel": plan.cancel,
        "short_deadline": plan.short_deadline,
        "session_workers": args.session_workers,
        "translate_workers": args.translate_workers,
        "completed_streams": tally.streams,
        "tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed),
        "wrong_token_counts": tally.wrong_counts,
        "client_codes": {f"{m} {c}": n for (m, c), n in sorted(tally.codes.items())},
        "client_vs_server": rows,
        "unexpected_codes": unexpected,
        "rss_mb_after_warmup": warm[0],
        "rss_mb_end": warm[-1],
        "rss_growth_after_warmup": round(warm[-1] / warm[0] - 1, 4),
        "samples": samples,
        "passed": not unexpected and tally.wrong_counts == 0,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=128, help="concurrent Generate streams")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--session-workers", type=int, default=4)
    parser.add_argument("--translate-workers", type=int, default=2)
    parser.add_argument("--cancel", type=float, default=0.2, help="share of streams cancelled by the client")
    parser.add_argument("--short-deadline", type=float, default=0.05, help="share with a 5-50 ms deadline")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--every", type=float, default=15.0, help="report interval in seconds")
    parser.add_argument("--warmup", type=float, default=30.0, help="RSS growth is measured from here (s)")
    parser.add_argument("--lm", type=Path, default=ROOT / "tests" / "bundles" / "tiny")
    parser.add_argument("--translator", type=Path, default=ROOT / "tests" / "bundles" / "tiny-mt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.streams <= 1024 or not 0 < args.seconds <= 3600:
        raise SystemExit("soak: --streams must be in 1..1024 and --seconds in (0, 3600]")
    plan = Plan(
        load_manifest(args.lm, verify=False).name,
        load_manifest(args.translator, verify=False).name,
        args.cancel,
        args.short_deadline,
        args.max_tokens,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for bundle in (args.lm, args.translator):
            shutil.copytree(bundle, Path(tmp) / bundle.name)
        metrics_port = free_port()
        server = ServerProcess(Path(tmp), "--metrics-port", str(metrics_port), "--max-sessions", "100000")
        try:
            tally, samples, elapsed = asyncio.run(soak(server.target, server.process.pid, plan, args))
            counts = server_counts(metrics_port)
        finally:
            server.stop()
    result = summarise(args, plan, tally, samples, elapsed, counts, compare(tally.codes, counts))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "client_vs_server")}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
