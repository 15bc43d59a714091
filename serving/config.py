"""Server configuration: defaults here, overridden by a TOML file (``--config``), then by CLI flags.

Every field may appear in the TOML file at top level, e.g. ``max_streams = 128``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from serving import state_token
from serving.errors import UserError

AUTH_ENV = "RNNLAB_AUTH_TOKEN"


class ConfigError(UserError):
    """A one-line, user-facing configuration error."""


@dataclass
class ServerConfig:
    models: str = "bundles"  # directory holding one bundle per subdirectory (or a bundle itself)
    host: str = "127.0.0.1"  # "0.0.0.0" / "[::]" to listen on every interface
    port: int = 50151  # 0 picks a free port (printed on stdout)
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None disables, 0 picks a free port
    ort_threads: int = 1  # onnxruntime intra-op threads per model (per translation worker)
    # translation batches searched at once per translator (threads): 2, or 1 on a one-core machine
    translate_workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    batching: bool = True  # False: one stream per ORT call (max_batch 1), for comparison
    max_batch: int = 256  # streams per batched decode step; more wait in the queue
    prefill_chunk: int = 256  # prompt tokens read per step, so prefill never stalls decoding long
    flush_ms: float = 1.0  # hand tokens to the event loop at most this often (first/last at once)
    max_messages_per_s: float = 2000  # ... and rarely enough to send at most this many stream messages per s
    prompt_cache_entries: int = 4096  # prompt states kept per model: shared prompts skip prefill (0: off)
    prompt_cache_bytes: int = 64 * 2**20
    max_prompt_chars: int = 32_768
    # One limit story: prompts and appended text are checked in characters first (the unit clients see);
    # the token limit, as large, only bites for tokenizers that make more tokens than characters.
    max_prompt_tokens: int = 32_768
    max_tokens: int = 4_096  # cap on max_tokens per call
    default_max_tokens: int = 256  # when a call leaves max_tokens 0
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_streams: int = 512  # concurrent generations over all models
    max_sessions: int = 100_000
    max_session_bytes: int = 512 * 2**20
    session_ttl_s: float = 3600.0
    evict_idle_sessions: bool = True  # evict least recently used idle sessions when the store is full
    max_message_bytes: int = 4 * 2**20
    # translation (rnnlab.v1.Translation): limits on TranslateOptions and on one Translate call
    translate_max_sentences: int = 4096  # more in one Translate call: RESOURCE_EXHAUSTED (use the stream)
    translate_max_beam: int = 16
    translate_max_length: int = 1024  # cap on TranslateOptions.max_length (output tokens)
    translate_max_length_ratio: float = 10.0
    translate_max_length_penalty: float = 5.0
    translate_gather_ms: float = 3.0  # a batcher waits this long after the oldest sentence for company
    grace_s: float = 10.0  # SIGTERM: seconds in-flight calls may take to finish
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no auth (env adds one)
    state_key: str | None = None  # HMAC key for state tokens; else state_key_file, $RNNLAB_STATE_KEY, random
    state_key_file: str | None = None  # file holding the key, shared by replicas (--state-key-file)
    log_level: str = "INFO"

    def validate(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        if self.state_key and self.state_key_file:
            raise ConfigError("state_key and state_key_file (--state-key-file) exclude each other")
        if self.state_key_file:
            state_token.read_key_file(self.state_key_file)  # refused at start, before bundles load
        for name in (
            "max_batch",
            "prefill_chunk",
            "max_prompt_chars",
            "max_prompt_tokens",
            "max_tokens",
            "default_max_tokens",
            "max_streams",
            "max_sessions",
            "max_session_bytes",
            "max_message_bytes",
            "ort_threads",
            "translate_workers",
            "translate_max_sentences",
            "translate_max_beam",
            "translate_max_length",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("prompt_cache_entries", "prompt_cache_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        for name in (
            "flush_ms",
            "translate_gather_ms",
            "translate_max_length_ratio",
            "translate_max_length_penalty",
        ):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.max_messages_per_s > 0:
            raise ConfigError(f"max_messages_per_s must be > 0, not {self.max_messages_per_s}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, not {self.port}")
        return self

    @property
    def batch_limit(self) -> int:
        return self.max_batch if self.batching else 1

    def bearer_tokens(self) -> list[str]:
        env = os.environ.get(AUTH_ENV)
        return [*self.auth_tokens, env] if env else list(self.auth_tokens)


def load_config(path: str | Path | None = None, **overrides: object) -> ServerConfig:
    """Defaults, then the TOML file, then every override that is not None."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerConfig(**values).validate()  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
