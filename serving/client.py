"""A small synchronous client for the rnnlab gRPC API.

with Client("127.0.0.1:50151") as client:
    for piece in client.generate_text("tiny", "The Time", max_tokens=64):
        print(piece, end="", flush=True)
    session = client.open_session("tiny", prompt="Hello")
    print("".join(session.generate_text(max_tokens=20)))
    token = session.export()          # resume anywhere: client.resume(token)
    session.close()
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.api.rnnlab.v1 import translation_pb2_grpc as tpb_grpc
from serving.search import DEFAULT_SEARCH


def sampling_options(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> pb.SamplingOptions:
    options = pb.SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        options.seed = seed
    return options


@dataclass(frozen=True)
class ErrorDetails:
    """The google.rpc.Status details of a failed call (see generation.proto): what a program acts on."""

    reason: str | None  # ErrorInfo.reason, e.g. "MODEL_NOT_FOUND", "STREAMS_EXHAUSTED"
    retry_after_s: float | None  # RetryInfo: a retry may succeed after this long; None: do not retry
    fields: tuple[tuple[str, str], ...]  # BadRequest: (field path, what is wrong)


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Reads the details of an error raised by a call (empty when the server sent none)."""
    reason, retry, fields = None, None, []
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            info = error_details_pb2.BadRequest()
            detail.Unpack(info)
            fields += [(v.field, v.description) for v in info.field_violations]
    return ErrorDetails(reason, retry, tuple(fields))


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {address!r} is not host:port")
    return host.strip("[]"), port


def channel_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for one or more addresses ("a:1,b:2" or a list).

    One address is passed on as it is (``host:port``, or a resolver URI such as ``dns:///svc:50151``,
    whose every address round_robin then uses: a headless Kubernetes Service). Several ``host:port``
    become one ``ipv4:`` (or ``ipv6:``) address list; host names among them are resolved once, here.
    """
    items = [t.strip() for t in ([targets] if isinstance(targets, str) else targets) for t in t.split(",")]
    items = [t for t in items if t]
    if not items:
        raise ValueError("no target given")
    if len(items) == 1:
        return items[0]
    if any("://" in t or t.startswith(("dns:", "ipv4:", "ipv6:", "unix:")) for t in items):
        raise ValueError("a resolver URI (dns:///..., ipv4:..., unix:...) must be the only target")
    addresses: dict[int, list[str]] = {4: [], 6: []}
    for host, port in map(_split_host_port, items):
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in dict.fromkeys(ips):
            addresses[ip.version].append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    version = 4 if addresses[4] else 6  # mixed families: gRPC's address lists hold one; IPv4 it is
    return f"ipv{version}:" + ",".join(dict.fromkeys(addresses[version]))


def balances(target: str) -> bool:
    """Whether the channel itself balances over several replicas: an address list or a ``dns:`` name.
    A single host:port is one server or a proxy (nginx), whose health is some replica's, not its own."""
    return target.startswith(("ipv4:", "ipv6:", "dns:"))


# Calls that may be sent again after UNAVAILABLE: those that change no session (or start one afresh).
# Append, Generate, CloseSession and Close act on a session by id: if a connection broke after the
# replica had done one, doing it again would do it twice.
RETRIED = (
    {"service": "rnnlab.v1.Generation"},
    {"service": "rnnlab.v1.Translation"},
    *({"service": "rnnlab.v1.Sessions", "method": m} for m in ("Open", "Export", "Resume", "Interact")),
)
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.02s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(health_check: bool = True) -> str:
    """The channel's service config: ``round_robin`` over every address of the target; gRPC client-side
    health checking unless ``health_check`` is off, so that a replica whose health turns NOT_SERVING
    (draining) leaves the rotation while its calls in flight finish; and gRPC retries of UNAVAILABLE
    for the calls in ``RETRIED``. gRPC retries a call only before any answer came back: a draining
    replica's refusal (``SERVER_DRAINING``, refused before any work) goes to the next pick, e.g. behind
    nginx; a stream cut after its first message is not retried."""
    config: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": list(RETRIED), "retryPolicy": RETRY_POLICY}],
    }
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


class Client:
    """``target``: "host:port", several ("a:1,b:2" or a list: round_robin over them), or a resolver URI
    ("dns:///svc:50151"); ``token`` sends "authorization: Bearer <token>"; ``tls_ca`` (PEM) turns on TLS;
    ``health_check``: watch each replica's health and leave NOT_SERVING ones out (default: when the
    channel balances itself, see ``balances``; False to ask a draining server its health)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        timeout: float | None = None,
        health_check: bool | None = None,
    ) -> None:
        target = channel_target(target)
        health_check = balances(target) if health_check is None else health_check
        options = [("grpc.service_config", service_config(health_check))]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.sessions = pb_grpc.SessionsStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.translation = tpb_grpc.TranslationStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"metadata": self.metadata, "timeout": timeout if timeout is not None else self.timeout}

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """ "SERVING", "NOT_SERVING", ...; raises grpc.RpcError when the server cannot be reached."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), **self._kw(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self.generation.ListModels(pb.ListModelsRequest(), **self._kw(timeout)).models)

    def model(self, name: str, timeout: float | None = None) -> pb.ModelInfo:
        return self.generation.GetModel(pb.GetModelRequest(model=name), **self._kw(timeout))

    def generate(
        self,
        model: str,
        prompt: str,
        max_tokens: int = 0,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """The raw stream: messages with text, token ids (and logprobs); the last one has ``end`` set."""
        request = pb.GenerateRequest(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=sampling_options(temperature, top_k, top_p, seed),
            stop=list(stop),
            logprobs=logprobs,
        )
        return self.generation.Generate(request, **self._kw(timeout))

    def generate_text(self, model: str, prompt: str, max_tokens: int = 0, **options: object) -> Iterator[str]:
        """Only the text pieces, as they arrive."""
        for message in self.generate(model, prompt, max_tokens, **options):
            if message.text:
                yield message.text

    def open_session(self, model: str, prompt: str = "", timeout: float | None = None) -> ClientSession:
        info = self.sessions.Open(pb.OpenSessionRequest(model=model, prompt=prompt), **self._kw(timeout))
        return ClientSession(self, info)

    def resume(self, token: bytes, timeout: float | None = None) -> ClientSession:
        info = self.sessions.Resume(pb.ResumeSessionRequest(token=token), **self._kw(timeout))
        return ClientSession(self, info)

    def interact(
        self,
        requests: Iterable[pb.InteractRequest],
        timeout: float | None = None,
    ) -> Iterator[pb.InteractResponse]:
        return self.sessions.Interact(iter(requests), **self._kw(timeout))

    # --- translation (serving/translation_service.py) ---
    def translators(self, timeout: float | None = None) -> list[tpb.TranslatorInfo]:
        reply = self.translation.ListTranslators(tpb.ListTranslatorsRequest(), **self._kw(timeout))
        return list(reply.models)

    def translate(
        self,
        model: str,
        sentences: Iterable[str],
        *,
        beam: int = DEFAULT_SEARCH.beam,
        length_penalty: float = DEFAULT_SEARCH.length_penalty,
        max_length_ratio: float = DEFAULT_SEARCH.max_len_ratio,
        max_length: int = 0,
        n_best: int = 1,
        timeout: float | None = None,
    ) -> list[tpb.TranslationResult]:
        """One result per sentence, in order (a bad sentence has ``failed``/``error`` set)."""
        options = tpb.TranslateOptions(
            beam_size=beam,
            length_penalty=length_penalty,
            n_best=n_best,
            max_length_ratio=max_length_ratio,
            max_length=max_length,
        )
        request = tpb.TranslateRequest(model=model, sentences=list(sentences), options=options)
        return list(self.translation.Translate(request, **self._kw(timeout)).results)

    def translate_stream(
        self,
        requests: Iterable[tpb.TranslateStreamRequest],
        timeout: float | None = None,
    ) -> Iterator[tpb.TranslateStreamResponse]:
        """Long jobs: results come back as they are ready, each with the id of its request."""
        return self.translation.TranslateStream(iter(requests), **self._kw(timeout))


class ClientSession:
    """A session on the server; its recurrent state stays there between calls."""

    def __init__(self, client: Client, info: pb.SessionInfo) -> None:
        self.client = client
        self.id = info.session_id
        self.model = info.model
        self.tokens = info.tokens

    def append(self, text: str, timeout: float | None = None) -> pb.SessionInfo:
        info = self.client.sessions.Append(
            pb.AppendRequest(session_id=self.id, text=text), **self.client._kw(timeout)
        )
        self.tokens = info.tokens
        return info

    def generate(
        self,
        max_tokens: int = 0,
        *,
        text: str = "",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        request = pb.SessionGenerateRequest(
            session_id=self.id,
            text=text,
            max_tokens=max_tokens,
            sampling=sampling_options(temperature, top_k, top_p, seed),
            stop=list(stop),
            logprobs=logprobs,
        )
        for message in self.client.sessions.Generate(request, **self.client._kw(timeout)):
            if message.HasField("end"):
                self.tokens = message.end.session_tokens
            yield message

    def generate_text(self, max_tokens: int = 0, **options: object) -> Iterator[str]:
        for message in self.generate(max_tokens, **options):
            if message.text:
                yield message.text

    def export(self, timeout: float | None = None) -> bytes:
        """A signed state token: ``Client.resume(token)`` continues from here on any replica with the key."""
        return self.client.sessions.Export(
            pb.ExportSessionRequest(session_id=self.id), **self.client._kw(timeout)
        ).token

    def close(self, timeout: float | None = None) -> None:
        self.client.sessions.CloseSession(
            pb.CloseSessionRequest(session_id=self.id), **self.client._kw(timeout)
        )
