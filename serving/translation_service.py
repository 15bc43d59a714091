"""The Translation gRPC service (rnnlab.v1.Translation) over seq2seq bundles, in the generation server.

Every loaded translator has a ``SentenceBatcher``: sentences of all concurrent calls (Translate's
batches, TranslateStream's items) queue there; a drain task waits up to ``gather_ms`` for more (or
until ``batch_tokens`` source tokens are queued), takes the oldest queued sentences that share search
options (sentences x longest source within ``batch_tokens``: on CPU, larger batches are slower per
sentence), and runs encoder + search for them in one of the model's ``workers`` threads, off the event
loop. A short queue is shared out among the idle workers (two half batches decode faster on two cores
than one whole batch on one); with every worker busy, the queue grows into the next batch. Each
sentence's future is resolved with its hypotheses, so one encoder call may serve several RPCs.

Status codes: unknown model NOT_FOUND; options out of range INVALID_ARGUMENT; more than
``MAX_SENTENCES`` sentences in one call RESOURCE_EXHAUSTED. A bad sentence (empty, longer than the
model's source limit) fails alone: its result has ``failed``/``error`` and the others are translated.
A bundle that cannot be loaded is logged and skipped; the others serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.api.rnnlab.v1 import translation_pb2_grpc as tpb_grpc
from serving.bundle import BundleError
from serving.search import DEFAULT_SEARCH
from serving.translator import Hypothesis, SearchParams, Seq2SeqRuntime

log = logging.getLogger("rnnlab.serve.translation")

SERVICE_NAME = "rnnlab.v1.Translation"
DEFAULT_BEAM, MAX_BEAM = DEFAULT_SEARCH.beam, 16
DEFAULT_RATIO, MAX_RATIO = DEFAULT_SEARCH.max_len_ratio, 10.0
DEFAULT_MAX_LENGTH, MAX_LENGTH = DEFAULT_SEARCH.max_len_cap, 1024
MAX_LENGTH_PENALTY = 5.0
MAX_SENTENCES = 4096
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class TranslationMetrics:
    """Prometheus metrics of the translation service, in the server's registry when given one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.batch = Histogram("rnnlab_translation_batch_sentences", "Sentences per encoder call",
                               ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.shared = Counter("rnnlab_translation_shared_batches",
                              "Encoder calls holding sentences of two or more RPCs", ["model"], registry=r)
        self.sentences = Counter("rnnlab_translation_sentences", "Sentences translated", ["model"],
                                 registry=r)
        self.latency = Histogram("rnnlab_translation_sentence_seconds",
                                 "From queueing a sentence to its result", ["model"], registry=r)


@dataclass
class _Item:
    ids: list[int]
    params: SearchParams
    call: int
    future: asyncio.Future
    queued: float


class SentenceBatcher:
    """Batches the sentences of concurrent calls for one model (see the module docstring).

    Only the drain task touches ``pending``; it runs while sentences are queued and then ends, so an
    idle model holds no task. A batch is taken only when a worker is free, so a busy model's batches
    fill up instead of queueing small.
    """

    def __init__(self, name: str, runtime: Seq2SeqRuntime, metrics: TranslationMetrics,
                 gather_ms: float = 3.0, batch_tokens: int = 600, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.name, self.runtime = name, runtime
        self.gather_s, self.batch_tokens = gather_ms / 1000, batch_tokens
        self.pending: list[_Item] = []
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"translate-{name}")
        self._busy = 0
        self._worker_free = asyncio.Event()
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._more = asyncio.Event()
        self._batch = metrics.batch.labels(name)
        self._shared = metrics.shared.labels(name)
        self._sentences = metrics.sentences.labels(name)
        self._latency = metrics.latency.labels(name)

    def submit(self, ids: list[int], params: SearchParams, call: int) -> asyncio.Future:
        """Queues one source (ids + EOS); the future gets its list of hypotheses."""
        loop = asyncio.get_running_loop()
        item = _Item(ids, params, call, loop.create_future(), loop.time())
        self.pending.append(item)
        self._more.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return item.future

    def _queued_tokens(self) -> int:
        return sum(len(item.ids) for item in self.pending)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            while self._busy == self.workers:
                self._worker_free.clear()
                await self._worker_free.wait()
            # Wait for company at most gather_ms after the oldest sentence arrived (not after the last batch).
            deadline = self.pending[0].queued + self.gather_s
            while self._queued_tokens() < self.batch_tokens and (left := deadline - loop.time()) > 0:
                self._more.clear()
                try:
                    await asyncio.wait_for(self._more.wait(), left)
                except TimeoutError:
                    break
            batch = self._take(idle_workers=self.workers - self._busy)
            if not batch:
                continue
            self._busy += 1
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Item]) -> None:
        """Searches one batch in a worker thread and resolves its sentences' futures."""
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._search, batch)
        except Exception as exc:  # a failing ORT call fails its sentences, not the batcher
            log.exception("translation batch of model %s failed", self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._busy -= 1
            self._worker_free.set()
        now = loop.time()
        for item, hyps in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(hyps)
                self._latency.observe(now - item.queued)

    def _take(self, idle_workers: int) -> list[_Item]:
        """The oldest live sentences with the oldest one's options, at most an even share of the queue
        per idle worker and while sentences x longest stays within the token budget (first come, first
        served: long sentences are not starved); sorted by length for the search."""
        self.pending = [item for item in self.pending if not item.future.done()]  # cancelled calls
        if not self.pending:
            return []
        max_sentences = -(-len(self.pending) // idle_workers)
        params = self.pending[0].params
        batch: list[_Item] = []
        rest: list[_Item] = []
        longest, full = 0, False
        for item in self.pending:
            if not full and item.params == params:
                size = max(longest, len(item.ids))
                full = bool(batch) and ((len(batch) + 1) * size > self.batch_tokens
                                        or len(batch) == max_sentences)
                if not full:
                    batch.append(item)
                    longest = size
                    continue
            rest.append(item)
        self.pending = rest
        return sorted(batch, key=lambda item: len(item.ids))

    def _search(self, batch: list[_Item]) -> list[list[Hypothesis]]:
        """Worker thread: encoder + search for one batch (one ORT encoder call)."""
        results = self.runtime.search_batch([item.ids for item in batch], batch[0].params)
        self._batch.observe(len(batch))
        self._sentences.inc(len(batch))
        if len({item.call for item in batch}) > 1:
            self._shared.inc()
        return results


@dataclass
class Translator:
    name: str
    runtime: Seq2SeqRuntime
    batcher: SentenceBatcher
    info: tpb.TranslatorInfo


def _numbers(data: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON object, nested keys joined with dots."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(data, bool) or not isinstance(data, int | float):
        return {}
    return {prefix.rstrip("."): float(data)}


def translator_info(runtime: Seq2SeqRuntime) -> tpb.TranslatorInfo:
    manifest = runtime.manifest
    languages = manifest.data.get("languages") or {}
    return tpb.TranslatorInfo(
        name=manifest.name, source_language=str(languages.get("source", "")),
        target_language=str(languages.get("target", "")),
        attention=manifest.architecture.get("attention") == "additive", source_vocab_size=runtime.src_vocab,
        target_vocab_size=runtime.tgt_vocab, evaluation=_numbers(manifest.evaluation or {}),
        bundle_digest=hashlib.sha256((manifest.path / "manifest.json").read_bytes()).hexdigest())


def search_params(options: tpb.TranslateOptions) -> SearchParams:
    """Proto options (0 = default) -> SearchParams; Refused(INVALID_ARGUMENT) when out of range."""
    beam = options.beam_size or DEFAULT_BEAM
    n_best = options.n_best or 1
    # float32 on the wire: 0.6 arrives as 0.60000002; round back to what the client wrote.
    ratio = float(f"{options.max_length_ratio:.6g}") or DEFAULT_RATIO
    alpha = (float(f"{options.length_penalty:.6g}") if options.HasField("length_penalty")
             else DEFAULT_SEARCH.length_penalty)
    max_length = options.max_length or DEFAULT_MAX_LENGTH
    problems = []
    if not 1 <= beam <= MAX_BEAM:
        problems.append(f"beam_size must be in 1..{MAX_BEAM}, not {beam}")
    if not 1 <= n_best <= beam:
        problems.append(f"n_best must be in 1..beam_size ({beam}), not {n_best}")
    if not (math.isfinite(ratio) and 0 < ratio <= MAX_RATIO):
        problems.append(f"max_length_ratio must be in (0, {MAX_RATIO:g}], not {ratio:g}")
    if not 1 <= max_length <= MAX_LENGTH:
        problems.append(f"max_length must be in 1..{MAX_LENGTH}, not {max_length}")
    if not (math.isfinite(alpha) and 0 <= alpha <= MAX_LENGTH_PENALTY):
        problems.append(f"length_penalty must be in [0, {MAX_LENGTH_PENALTY:g}], not {alpha:g}")
    if problems:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
    return SearchParams(beam=beam, length_penalty=alpha, max_len_ratio=ratio, max_len_cap=max_length,
                        n_best=n_best)


def _result(translator: Translator, hyps: list[Hypothesis], source_tokens: int) -> tpb.TranslationResult:
    decode = translator.runtime.tgt_tokenizer.decode
    return tpb.TranslationResult(
        hypotheses=[tpb.Hypothesis(text=decode(list(h.tokens)), score=h.normalized, token_ids=h.tokens)
                    for h in hyps], source_tokens=source_tokens)


def _failed(error: str) -> tpb.TranslationResult:
    return tpb.TranslationResult(failed=True, error=error)


class TranslationService(tpb_grpc.TranslationServicer):
    def __init__(self, translators: dict[str, Translator]) -> None:
        self.translators = translators
        self._calls = count(1)

    def _translator(self, name: str) -> Translator:
        if name not in self.translators:
            known = ", ".join(sorted(self.translators)) or "none"
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no translation model {name!r} (loaded: {known})")
        return self.translators[name]

    async def _translate_one(self, translator: Translator, sentence: str, params: SearchParams, call: int,
                             ) -> tpb.TranslationResult:
        try:
            ids, _warning = translator.runtime.encode_source(sentence)
        except ValueError as exc:
            return _failed(str(exc))
        hyps = await translator.batcher.submit(ids, params, call)
        return _result(translator, hyps, len(ids) - 1)

    async def Translate(self, request: tpb.TranslateRequest, context: grpc.aio.ServicerContext,
                        ) -> tpb.TranslateResponse:
        try:
            translator = self._translator(request.model)
            params = search_params(request.options)
            if len(request.sentences) > MAX_SENTENCES:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(request.sentences)} sentences in one call (limit {MAX_SENTENCES}); "
                              "split the batch or use TranslateStream")
        except Refused as exc:
            await context.abort(exc.code, exc.message)
        call = next(self._calls)
        tasks = [asyncio.ensure_future(self._translate_one(translator, s, params, call))
                 for s in request.sentences]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # a cancelled call (client gone, deadline) takes its queued sentences with it
            for task in tasks:
                task.cancel()
        return tpb.TranslateResponse(results=results)

    async def TranslateStream(self, request_iterator: AsyncIterator[tpb.TranslateStreamRequest],
                              context: grpc.aio.ServicerContext,
                              ) -> AsyncIterator[tpb.TranslateStreamResponse]:
        call = next(self._calls)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        translator: Translator | None = None
        params: SearchParams | None = None
        received = answered = 0

        async def answer(item_id: str, result: Awaitable[tpb.TranslationResult],
                         ) -> tpb.TranslateStreamResponse:
            return tpb.TranslateStreamResponse(id=item_id, result=await result)

        reader = asyncio.ensure_future(_pump(request_iterator, done))
        try:
            reading = True
            while reading or answered < received:
                kind, payload = await done.get()
                if kind == "request":
                    try:
                        if translator is None:
                            translator = self._translator(payload.model)
                        elif payload.model and payload.model != translator.name:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"one stream, one model: got {payload.model!r} after "
                                          f"{translator.name!r}")
                        if params is None and payload.HasField("options"):
                            params = search_params(payload.options)
                    except Refused as exc:
                        await context.abort(exc.code, exc.message)
                    item_params = params or search_params(tpb.TranslateOptions())
                    one = self._translate_one(translator, payload.sentence, item_params, call)
                    task = asyncio.ensure_future(answer(payload.id, one))
                    tasks.add(task)
                    task.add_done_callback(lambda t: done.put_nowait(("answer", t)))
                    received += 1
                elif kind == "answer":
                    tasks.discard(payload)
                    answered += 1
                    yield payload.result()
                elif kind == "end":
                    reading = False
                else:  # the request stream failed
                    raise payload
        finally:  # client cancel / deadline arrive here as CancelledError: drop the queued work
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def ListTranslators(self, request: tpb.ListTranslatorsRequest, context: grpc.aio.ServicerContext,
                              ) -> tpb.ListTranslatorsResponse:
        return tpb.ListTranslatorsResponse(models=[t.info for t in self.translators.values()])


async def _pump(request_iterator: AsyncIterator, done: asyncio.Queue) -> None:
    try:
        async for request in request_iterator:
            done.put_nowait(("request", request))
        done.put_nowait(("end", None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        done.put_nowait(("error", exc))


def load_translators(bundles: Iterable[Path], threads: int = 1, metrics: TranslationMetrics | None = None,
                     gather_ms: float = 3.0, workers: int = 1) -> dict[str, Translator]:
    """Every loadable seq2seq bundle by manifest name, each searching up to ``workers`` batches at once
    (threads of ``threads`` onnxruntime threads each); bad bundles are logged and skipped."""
    metrics = metrics or TranslationMetrics()
    translators: dict[str, Translator] = {}
    for path in bundles:
        started = time.perf_counter()
        try:
            runtime = Seq2SeqRuntime.load(path, threads=threads)
        except (BundleError, ValueError, KeyError, OSError) as exc:
            log.warning("refusing translation bundle %s: %s", path, exc)
            continue
        name = runtime.name
        if name in translators:
            log.warning("refusing translation bundle %s: model name %r is already served", path, name)
            continue
        translators[name] = Translator(name, runtime, SentenceBatcher(name, runtime, metrics, gather_ms,
                                                                       workers=workers),
                                       translator_info(runtime))
        log.info("serving translator %r from %s (%.2f s to load)", name, path, time.perf_counter() - started)
    return translators


def add_to_server(server: grpc.aio.Server, bundles: list[Path], config,
                  registry: CollectorRegistry | None = None) -> list[str]:
    """Registers the Translation service for the loadable bundles -> [its full name] (or [] if none)."""
    translators = load_translators(bundles, config.ort_threads, TranslationMetrics(registry),
                                   workers=config.translate_workers)
    if not translators:
        return []
    tpb_grpc.add_TranslationServicer_to_server(TranslationService(translators), server)
    return [SERVICE_NAME]
