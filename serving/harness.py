"""A real server on a loopback port, on an event loop of a background thread (tests, benchmarks, soak)."""

from __future__ import annotations

import asyncio
import threading

from serving.app import App
from serving.config import ServerConfig
from serving.server import RnnlabServer


class ServerThread:
    """A server on an event loop of a background thread (tests, benchmarks): ``with ServerThread(cfg):``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: RnnlabServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rnnlab-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def app(self) -> App:
        return self.server.app

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = RnnlabServer(self.config)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def call(self, coroutine, timeout: float = 60):
        """Runs a coroutine on the server's loop (state the store only touches from there)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
