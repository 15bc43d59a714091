"""Replicas: 2 rnnlab-serve processes behind nginx against 1, and nginx's own cost against direct calls.

    python -m bench.replicas [--bundle DIR] [--streams 64] [--tokens 256] [--repeats 7]

BENCH_BODY
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench import ROOT

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
