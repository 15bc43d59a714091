"""The Translation gRPC service (rnnlab.v1.Translation) over the seq2seq bundles of the registry.

Thin servicer methods over each translator's ``SentenceBatcher`` (serving.sentence_batcher). Errors are
raised and mapped by the server's one interceptor (serving.interceptor, serving.status): unknown model
NOT_FOUND; options out of range INVALID_ARGUMENT (on every TranslateStream message); more than
``ServerConfig.translate_max_sentences`` sentences in one call RESOURCE_EXHAUSTED. A bad sentence
(empty, longer than the model's source limit) fails alone: its result has ``failed``/``error`` and the
others are translated.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from itertools import count

import grpc

from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.api.rnnlab.v1 import translation_pb2_grpc as tpb_grpc
from serving.config import ServerConfig
from serving.errors import quote
from serving.metrics import TranslationMetrics
from serving.registry import LoadedBundle
from serving.search import DEFAULT_SEARCH
from serving.sentence_batcher import SentenceBatcher
from serving.status import Code, Refusal, invalid
from serving.translator import Hypothesis, SearchParams, Seq2SeqRuntime

log = logging.getLogger("rnnlab.serve.translation")

SERVICE_NAME = "rnnlab.v1.Translation"


@dataclass
class Translator:
    name: str
    runtime: Seq2SeqRuntime
    batcher: SentenceBatcher
    info: tpb.TranslatorInfo


def translator_info(bundle: LoadedBundle) -> tpb.TranslatorInfo:
    runtime: Seq2SeqRuntime = bundle.runtime
    manifest = runtime.manifest
    languages = manifest.data.get("languages") or {}
    return tpb.TranslatorInfo(
        name=manifest.name,
        source_language=str(languages.get("source", "")),
        target_language=str(languages.get("target", "")),
        attention=manifest.architecture.get("attention") == "additive",
        source_vocab_size=runtime.src_vocab,
        target_vocab_size=runtime.tgt_vocab,
        evaluation=manifest.evaluation_numbers(),
        bundle_digest=bundle.digest,
    )


def search_params(options: tpb.TranslateOptions, config: ServerConfig) -> SearchParams:
    """Proto options (0 or unset = the server default, DEFAULT_SEARCH) -> SearchParams; Refusal
    (INVALID_ARGUMENT) naming every option out of the ServerConfig limits."""
    beam = options.beam_size or DEFAULT_SEARCH.beam
    n_best = options.n_best or 1
    # float32 on the wire: 0.6 arrives as 0.60000002; round back to what the client wrote.
    ratio = float(f"{options.max_length_ratio:.6g}") or DEFAULT_SEARCH.max_len_ratio
    alpha = (
        float(f"{options.length_penalty:.6g}")
        if options.HasField("length_penalty")
        else DEFAULT_SEARCH.length_penalty
    )
    max_length = options.max_length or DEFAULT_SEARCH.max_len_cap
    max_beam, max_ratio = config.translate_max_beam, config.translate_max_length_ratio
    max_cap, max_alpha = config.translate_max_length, config.translate_max_length_penalty
    problems = []
    if not 1 <= beam <= max_beam:
        problems.append(f"beam_size must be in 1..{max_beam}, not {beam}")
    if not 1 <= n_best <= beam:
        problems.append(f"n_best must be in 1..beam_size ({beam}), not {n_best}")
    if not (math.isfinite(ratio) and 0 < ratio <= max_ratio):
        problems.append(f"max_length_ratio must be in (0, {max_ratio:g}], not {ratio:g}")
    if not 1 <= max_length <= max_cap:
        problems.append(f"max_length must be in 1..{max_cap}, not {max_length}")
    if not (math.isfinite(alpha) and 0 <= alpha <= max_alpha):
        problems.append(f"length_penalty must be in [0, {max_alpha:g}], not {alpha:g}")
    if problems:
        fields = [(f"options.{problem.split()[0]}", problem) for problem in problems]
        raise Refusal(Code.INVALID_ARGUMENT, "; ".join(problems), fields=fields)
    return SearchParams(
        beam=beam, length_penalty=alpha, max_len_ratio=ratio, max_len_cap=max_length, n_best=n_best
    )


def _result(translator: Translator, hyps: list[Hypothesis], source_tokens: int) -> tpb.TranslationResult:
    decode = translator.runtime.tgt_tokenizer.decode
    return tpb.TranslationResult(
        hypotheses=[
            tpb.Hypothesis(text=decode(list(h.tokens)), score=h.normalized, token_ids=h.tokens) for h in hyps
        ],
        source_tokens=source_tokens,
    )


def _failed(error: str) -> tpb.TranslationResult:
    return tpb.TranslationResult(failed=True, error=error)


class TranslationService(tpb_grpc.TranslationServicer):
    def __init__(self, translators: dict[str, Translator], config: ServerConfig) -> None:
        self.translators = translators
        self.config = config
        self._calls = count(1)

    def _translator(self, name: str) -> Translator:
        if name not in self.translators:
            known = ", ".join(sorted(self.translators)) or "none"
            raise Refusal(
                Code.NOT_FOUND, f"no translation model {quote(name)} (loaded: {known})", "MODEL_NOT_FOUND"
            )
        return self.translators[name]

    async def _translate_one(
        self,
        translator: Translator,
        sentence: str,
        params: SearchParams,
        call: int,
    ) -> tpb.TranslationResult:
        try:
            ids, _warning = translator.runtime.encode_source(sentence)
        except ValueError as exc:
            return _failed(str(exc))
        hyps = await translator.batcher.submit(ids, params, call)
        return _result(translator, hyps, len(ids) - 1)

    async def Translate(
        self,
        request: tpb.TranslateRequest,
        context: grpc.aio.ServicerContext,
    ) -> tpb.TranslateResponse:
        translator = self._translator(request.model)
        params = search_params(request.options, self.config)
        limit = self.config.translate_max_sentences
        if len(request.sentences) > limit:
            raise Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"{len(request.sentences)} sentences in one call (limit {limit}); "
                "split the batch or use TranslateStream",
                "TOO_MANY_SENTENCES",
            )
        call = next(self._calls)
        tasks = [
            asyncio.ensure_future(self._translate_one(translator, s, params, call)) for s in request.sentences
        ]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # a cancelled call (client gone, deadline) takes its queued sentences with it
            for task in tasks:
                task.cancel()
        return tpb.TranslateResponse(results=results)

    async def TranslateStream(
        self,
        request_iterator: AsyncIterator[tpb.TranslateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tpb.TranslateStreamResponse]:
        call = next(self._calls)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        translator: Translator | None = None
        params: SearchParams | None = None
        received = answered = 0

        async def answer(
            item_id: str,
            result: Awaitable[tpb.TranslationResult],
        ) -> tpb.TranslateStreamResponse:
            return tpb.TranslateStreamResponse(id=item_id, result=await result)

        reader = asyncio.ensure_future(_pump(request_iterator, done))
        try:
            reading = True
            while reading or answered < received:
                kind, payload = await done.get()
                if kind == "request":
                    if translator is None:
                        translator = self._translator(payload.model)
                    elif payload.model and payload.model != translator.name:
                        raise invalid(
                            "model",
                            f"one stream, one model: got {quote(payload.model)} after {translator.name!r}",
                        )
                    if payload.HasField("options"):  # every message's options are checked; the first apply
                        checked = search_params(payload.options, self.config)
                        params = params or checked
                    item_params = params or search_params(tpb.TranslateOptions(), self.config)
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

    async def ListTranslators(
        self,
        request: tpb.ListTranslatorsRequest,
        context: grpc.aio.ServicerContext,
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


def add_to_server(
    server: grpc.aio.Server,
    bundles: dict[str, LoadedBundle],
    config: ServerConfig,
    metrics: TranslationMetrics,
    on_stop: list[Callable[[], None]],
) -> bool:
    """Registers the Translation service over the seq2seq bundles -> whether there were any; the
    batchers' closing goes into ``on_stop``."""
    translators = {
        name: Translator(
            name,
            bundle.runtime,
            SentenceBatcher(
                name, bundle.runtime, metrics, config.translate_gather_ms, workers=config.translate_workers
            ),
            translator_info(bundle),
        )
        for name, bundle in bundles.items()
    }
    if translators:
        tpb_grpc.add_TranslationServicer_to_server(TranslationService(translators, config), server)
    on_stop += [translator.batcher.close for translator in translators.values()]
    return bool(translators)
