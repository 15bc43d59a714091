"""Sentence batching for the translation service: the sentences of concurrent calls share encoder calls.

Every loaded translator has a ``SentenceBatcher``: sentences of all concurrent calls (Translate's
batches, TranslateStream's items) queue there; a drain task waits up to ``gather_ms`` for more (or
until ``batch_tokens`` source tokens are queued), takes the oldest queued sentences that share search
options (sentences x longest source within ``batch_tokens``: on CPU, larger batches are slower per
sentence), and runs encoder + search for them in one of the model's ``workers`` threads, off the event
loop. A short queue is shared out among the idle workers (two half batches decode faster on two cores
than one whole batch on one); with every worker busy, the queue grows into the next batch. Each
sentence's future is resolved with its hypotheses, so one encoder call may serve several RPCs.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from serving.metrics import TranslationMetrics
from serving.search import BATCH_TOKENS
from serving.translator import Hypothesis, SearchParams, Seq2SeqRuntime

log = logging.getLogger("rnnlab.serve.translation")


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

    def __init__(
        self,
        name: str,
        runtime: Seq2SeqRuntime,
        metrics: TranslationMetrics,
        gather_ms: float = 3.0,
        batch_tokens: int = BATCH_TOKENS,
        workers: int = 1,
    ) -> None:
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

    def close(self) -> None:
        """At server stop: the drain task ends and the worker threads go (calls have ended by now)."""
        if self._task is not None:
            self._task.cancel()
        for task in self._running:
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

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
                full = bool(batch) and (
                    (len(batch) + 1) * size > self.batch_tokens or len(batch) == max_sentences
                )
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
