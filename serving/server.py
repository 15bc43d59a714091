"""``rnnlab-serve``: the gRPC server (grpc.aio) over every bundle of a models directory: lifecycle, CLI.

The server is assembled from parts with one job each: ``serving.registry`` loads every bundle by kind,
``SERVICES`` below lists the services (a new model family adds one entry and a loader), and one
interceptor (``serving.interceptor``) authenticates, parses, maps errors (``serving.status``) and counts
every call of every service. Bad bundles are refused with a logged reason while the good ones serve.
Standard health checking and server reflection are on; SIGTERM drains: health turns NOT_SERVING and
open health watches end, new calls get UNAVAILABLE, calls in flight get ``grace_s`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import translation_service
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.app import App
from serving.auth import BearerAuth
from serving.config import ConfigError, ServerConfig, load_config
from serving.errors import run_command
from serving.generation_service import GenerationService
from serving.health import DrainingHealth
from serving.interceptor import CallInterceptor
from serving.metrics import ServerMetrics, TranslationMetrics
from serving.registry import LoadedBundle, load_bundles
from serving.session_service import SessionService

log = logging.getLogger("rnnlab.serve")


@dataclass
class Parts:
    """What a service's ``add`` gets: the loaded bundles by kind, the shared App, config and metrics, and
    ``on_stop``, where it leaves what must run when the server has stopped (closing its threads)."""

    config: ServerConfig
    bundles: dict[str, dict[str, LoadedBundle]]
    app: App
    metrics: ServerMetrics
    on_stop: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class Service:
    """One gRPC service: ``name`` for health and reflection, ``label`` for ``rnnlab_requests{method}``,
    ``add`` registers the servicer and says whether it serves anything (False: left out)."""

    name: str
    label: str
    add: Callable[[grpc.aio.Server, Parts], bool]


def _add_generation(server: grpc.aio.Server, parts: Parts) -> bool:
    pb_grpc.add_GenerationServicer_to_server(GenerationService(parts.app), server)
    return True


def _add_sessions(server: grpc.aio.Server, parts: Parts) -> bool:
    pb_grpc.add_SessionsServicer_to_server(SessionService(parts.app), server)
    return True


def _add_translation(server: grpc.aio.Server, parts: Parts) -> bool:
    metrics = TranslationMetrics(parts.metrics.registry)
    return translation_service.add_to_server(
        server, parts.bundles["seq2seq"], parts.config, metrics, parts.on_stop
    )


SERVICES: tuple[Service, ...] = (
    Service("rnnlab.v1.Generation", "GenerationService", _add_generation),
    Service("rnnlab.v1.Sessions", "SessionService", _add_sessions),
    Service(translation_service.SERVICE_NAME, "TranslationService", _add_translation),
)


class RnnlabServer:
    """A running server: ``await start()``, then ``port``; ``await stop(grace)`` drains and ends it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.bundles = load_bundles(config.models, config.ort_threads)
        self.metrics = ServerMetrics()
        self.app = App(config, self.bundles["lm"], self.metrics)
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = DrainingHealth()
        self._sweeper: asyncio.Task | None = None
        self._parts: Parts | None = None
        tokens = config.bearer_tokens()
        self._calls = CallInterceptor(
            self.metrics.requests, {s.name: s.label for s in SERVICES}, BearerAuth(tokens) if tokens else None
        )

    async def start(self) -> int:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        server = grpc.aio.server(interceptors=[self._calls], options=options)
        parts = self._parts = Parts(config, self.bundles, self.app, self.metrics)
        services = [service.name for service in SERVICES if service.add(server, parts)]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = self._listen(server)
        self.app.start(asyncio.get_running_loop())
        await server.start()
        self._server = server
        for name in ["", *services]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.metrics_port, config.host)
        self._sweeper = asyncio.create_task(self._sweep())
        log.info(
            "listening on %s:%d (%d models)%s",
            config.host,
            self.port,
            len(self.app.models),
            f", metrics on :{self.metrics_port}" if self.metrics_port is not None else "",
        )
        return self.port

    def _listen(self, server: grpc.aio.Server) -> int:
        config = self.config
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
                )
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc.aio raises it when the address cannot be bound
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address}")
        return port

    async def _sweep(self) -> None:
        period = max(0.5, min(30.0, self.config.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self.app.sessions.expire()

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health NOT_SERVING (watches end), new calls UNAVAILABLE, calls in flight get ``grace``
        seconds; then the server stops (cancelling what is left) and the engines end."""
        if self._server is None:
            return
        grace = self.config.grace_s if grace is None else grace
        started = time.monotonic()
        await self._health.drain()
        self._calls.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not await self._calls.wait_idle(grace):
            log.warning("grace period of %.1f s over: cancelling the calls still running", grace)
        await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        self._server = None
        for close in self._parts.on_stop:
            close()
        await asyncio.get_running_loop().run_in_executor(None, self.app.stop)
        self.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlab-serve", description="Serve rnnlab bundles over gRPC.")
    parser.add_argument("--models", help="directory of bundles (or one bundle directory)")
    parser.add_argument("--port", type=int, help="gRPC port (0: a free one, printed on stdout)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--config", help="server.toml with any ServerConfig setting")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: a free one)")
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_const",
        const=False,
        help="one stream per ORT call (comparison runs)",
    )
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--max-streams", type=int)
    parser.add_argument("--max-sessions", type=int)
    parser.add_argument("--prompt-cache-entries", type=int, help="prompt states cached per model (0: off)")
    parser.add_argument(
        "--translate-workers",
        type=int,
        help="translation batches searched at once per translator (default 2; 1 on one core)",
    )
    parser.add_argument(
        "--state-key-file",
        help="file holding the state-token signing key, shared by replicas (at least 16 bytes; "
        "default: state_key in --config, else $RNNLAB_STATE_KEY)",
    )
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--grace", dest="grace_s", type=float, help="SIGTERM drain grace period in seconds")
    parser.add_argument("--log-level")
    return parser


async def _serve(config: ServerConfig) -> None:
    server = RnnlabServer(config)
    port = await server.start()
    print(f"rnnlab-serve listening on {config.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    draining = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, draining.set)
    await draining.wait()
    log.info("draining: refusing new calls, %.1f s for calls in flight", config.grace_s)
    await server.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    return run_command(lambda: _serve_from(load_config(args.config, **overrides)))


def _serve_from(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
