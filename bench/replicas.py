"""Replicas: 2 rnnlab-serve processes behind nginx against 1, and nginx's own cost against direct calls.

    python -m bench.replicas [--bundle DIR] [--streams 64] [--tokens 1024] [--repeats 11]

Side by side in one run, taking turns (each figure the median of ``--repeats`` runs of ``--streams``
concurrent streams of ``--tokens`` tokens, the load of bench/serve_load.py from this process):
- ``direct_1``: the client straight to one replica;
- ``nginx_1``: the same replica through nginx (``deploy/nginx/nginx.conf``): nginx's own cost;
- ``nginx_2``: two replicas through nginx;
- ``round_robin_2``: two replicas, balanced by the client's channel (``round_robin``, no proxy).
Every replica is an ``rnnlab-serve`` process with the defaults (batching, ort_threads 1); nginx runs
``worker_processes auto``. Clients, nginx and replicas share the machine's cores, so on 2 cores two
replicas cannot double anything: the JSON records the core count. Same bundle choice as
bench/serve_load.py. Writes bench/results/replicas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT
from serving.client import channel_target, service_config

RESULTS = ROOT / "bench" / "results" / "replicas.json"

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
INSTALL_HINT = "install it: `make nginx`, or `apt-get install -y nginx` (Debian/Ubuntu, as root)"


class NginxMissing(RuntimeError):
    """No nginx binary: the message says how to install it."""


def nginx_binary() -> str:
    """The nginx executable (also looked for in /usr/sbin, which a non-root PATH may lack)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NginxMissing(f"nginx is not installed; {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """nginx running ``deploy/nginx/nginx.conf`` unchanged from a run directory of its own.

    The run directory holds a link to the config and the two files it includes: ``listen.conf`` (a free
    loopback port, so that test workers and other checkouts on the machine never collide) and
    ``replicas.conf`` (``replicas``: "host:port" of each rnnlab-serve). ``target`` is nginx's address.
    """

    def __init__(
        self, run_dir: Path, replicas: list[str], options: str = "max_fails=1 fail_timeout=5s"
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "nginx.conf").unlink(missing_ok=True)
        (self.run_dir / "nginx.conf").symlink_to(NGINX_CONF)
        lines = [f"server {address} {options};" for address in replicas]
        (self.run_dir / "replicas.conf").write_text("\n".join(lines) + "\n")
        self.log = self.run_dir / "error.log"
        for attempt in range(5):  # the free port may be taken between the probe and nginx's bind
            self.port = free_port()
            (self.run_dir / "listen.conf").write_text(f"listen 127.0.0.1:{self.port} http2;\n")
            self.process = self._start()
            if self._wait_listening():
                self.target = f"127.0.0.1:{self.port}"
                return
            self.process.wait(10)
            error = self.log.read_text()
            if "Address already in use" not in error or attempt == 4:
                raise RuntimeError(f"nginx did not start ({NGINX_CONF}): {error.strip()}")

    def _start(self) -> subprocess.Popen:
        command = [nginx_binary(), "-p", f"{self.run_dir}/", "-c", str(self.run_dir / "nginx.conf")]
        command += ["-e", "stderr", "-g", "daemon off;"]
        with self.log.open("w") as log:  # a file, not a pipe nobody reads: a full pipe would block nginx
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown: ends the connections at once
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def measure(
    routes: dict[str, tuple[str, tuple]], model: str, streams: int, tokens: int, repeats: int
) -> dict:
    """The median run of every route (``name: (target, channel options)``), the routes taking turns."""
    from bench.serve_load import load

    runs: dict[str, list[dict]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, (target, options) in routes.items():
            runs[name].append(asyncio.run(load(target, model, streams, tokens, options)))
            print(
                f"{name:14s} {streams} streams: {runs[name][-1]['tokens_per_s']:,.0f} tokens/s",
                file=sys.stderr,
            )
    rows = {}
    for name, figures in runs.items():
        ranked = sorted(figures, key=lambda f: f["tokens_per_s"])
        rows[name] = {**ranked[len(ranked) // 2], "runs_tokens_per_s": [f["tokens_per_s"] for f in figures]}
    return rows


def ratios(rows: dict) -> dict:
    """``a_vs_b`` for the pairs reported: the ratio of medians, and the median of the ratios of runs made
    in the same round (back to back, so the machine's other load drifts less between them)."""
    pairs = [
        ("nginx_2", "direct_1"),
        ("nginx_2", "nginx_1"),
        ("nginx_1", "direct_1"),
        ("round_robin_2", "direct_1"),
    ]
    result = {}
    for a, b in pairs:
        runs = zip(rows[a]["runs_tokens_per_s"], rows[b]["runs_tokens_per_s"], strict=True)
        result[f"{a}_vs_{b}"] = {
            "of_medians": round(rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"], 3),
            "median_of_paired_runs": round(statistics.median(x / y for x, y in runs), 3),
        }
    return result


def nginx_version() -> str:
    done = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=True)
    return done.stderr.strip().split("/")[-1]


def main(argv: list[str] | None = None) -> int:
    from bench.serve_load import ServerProcess, choose_bundle
    from serving.runtime import LMRuntime

    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="LM bundle (default: as bench/serve_load.py)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024, help="per stream (runs of seconds: steadier)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle, described = choose_bundle(args.bundle, None, Path(tmp))
        model = LMRuntime.load(bundle).manifest.name
        load_before = os.getloadavg()[0]
        replicas = [ServerProcess(bundle), ServerProcess(bundle)]
        targets = [replica.target for replica in replicas]
        fronts: list[Nginx] = []
        try:
            fronts.append(Nginx(Path(tmp) / "nginx-1", targets[:1]))
            fronts.append(Nginx(Path(tmp) / "nginx-2", targets))
            routes = {
                "direct_1": (replicas[0].target, ()),
                "nginx_1": (fronts[0].target, ()),
                "nginx_2": (fronts[1].target, ()),
                "round_robin_2": (
                    channel_target(targets),
                    (("grpc.service_config", service_config(health_check=True)),),
                ),
            }
            rows = measure(routes, model, args.streams, args.tokens, args.repeats)
        finally:
            for process in [*fronts, *replicas]:
                process.stop()
    results = {
        "bundle": described,
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nginx": nginx_version()},
        # the machine is shared: the 1-minute load average before and after the run
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "routes": rows,
        "ratios": ratios(rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
