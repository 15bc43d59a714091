"""Prometheus metrics of one server, in a registry of its own (several servers can share a process)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class ModelMetrics:
    """The children of one model's label, looked up once (the step loop updates them every step)."""

    ttft: Histogram
    inter_token: Histogram
    queue: Histogram
    batch: Histogram
    tokens: Counter
    prompt_tokens: Counter
    prompt_cache_hits: Counter


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "rnnlab_time_to_first_token_seconds",
            "From receiving a generation call to its first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "rnnlab_inter_token_seconds",
            "Time between consecutive decode steps of a model (each active stream gets one token per step)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "rnnlab_queue_seconds",
            "From receiving a generation call to its first ORT call",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "rnnlab_batch_size",
            "Streams per batched decode step",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("rnnlab_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "rnnlab_prompt_tokens", "Prompt and appended tokens read", ["model"], registry=r
        )
        self.prompt_cache_hits = Counter(
            "rnnlab_prompt_cache_hits",
            "Prompts whose state came from the prompt cache, not a prefill",
            ["model"],
            registry=r,
        )
        self.active_streams = Gauge("rnnlab_active_streams", "Generation calls in progress", registry=r)
        self.sessions = Gauge("rnnlab_sessions", "Open sessions", registry=r)
        self.session_bytes = Gauge("rnnlab_session_bytes", "Bytes held by open sessions", registry=r)
        self.requests = Counter(
            "rnnlab_requests", "Finished RPCs by method and status code", ["method", "code"], registry=r
        )
        self.models = Gauge("rnnlab_models", "Language models being served", registry=r)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(
            self.ttft.labels(model),
            self.inter_token.labels(model),
            self.queue.labels(model),
            self.batch.labels(model),
            self.tokens.labels(model),
            self.prompt_tokens.labels(model),
            self.prompt_cache_hits.labels(model),
        )

    def serve_http(self, port: int, host: str) -> int:
        """Starts the /metrics endpoint on a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if getattr(self, "_http", None) is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class TranslationMetrics:
    """Prometheus metrics of the translation service, in the server's registry when given one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.batch = Histogram(
            "rnnlab_translation_batch_sentences",
            "Sentences per encoder call",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.shared = Counter(
            "rnnlab_translation_shared_batches",
            "Encoder calls holding sentences of two or more RPCs",
            ["model"],
            registry=r,
        )
        self.sentences = Counter(
            "rnnlab_translation_sentences", "Sentences translated", ["model"], registry=r
        )
        self.latency = Histogram(
            "rnnlab_translation_sentence_seconds",
            "From queueing a sentence to its result",
            ["model"],
            registry=r,
        )


class ForecastMetrics:
    """Prometheus metrics of the forecasting service, in the server's registry when given one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.batch = Histogram(
            "rnnlab_forecast_batch_streams",
            "Streams (and Forecast calls) per batched ORT call of a forecaster",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.observations = Counter(
            "rnnlab_forecast_observations", "Observations read into forecast states", ["model"], registry=r
        )
        self.streams = Gauge("rnnlab_forecast_streams", "ForecastStream calls in progress", registry=r)
        self.sessions = Gauge(
            "rnnlab_forecast_sessions",
            "Forecast stream sessions (live streams and kept sessions)",
            registry=r,
        )
