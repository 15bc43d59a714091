"""Continuous batching: one step loop per model runs every active stream as one batched ORT call.

A model's loop runs on a thread of its own, so that onnxruntime and the per-step numpy work stay off the
event loop. Each iteration

1. drops cancelled streams and admits new ones;
2. reads prompts ("prefill") over the time axis for a bounded number of prompt tokens, joiners with equal
   remaining lengths batched together, so a long prompt never stalls decoding for long;
3. runs one decode step for the batch: sample the next token of every row (``lm.sampling.sample_next``
   with each row's own options and uniforms from each stream's own generator), emit it, retire finished
   streams, and feed the others' tokens to the model in one (B, 1) call.

The batch state lives in the (L, B, H) arrays onnxruntime returned for the previous step: a step whose
membership did not change feeds them back without a copy; joins and leaves gather rows with one vectorised
``np.take``/``np.concatenate`` per state tensor.

Results reach the event loop once per iteration (``call_soon_threadsafe``) and accumulate in each stream's
buffer; the stream's writer sends everything accumulated as one message, so a slow reader receives
larger messages instead of holding the batch back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from lm.sampling import SamplingParams, StopMatcher, sample_next
from serving.metrics import ModelMetrics
from serving.runtime import LMRuntime

log = logging.getLogger(__name__)


class Finish(Enum):
    LENGTH = 1
    STOP = 2
    EOS = 3
    APPENDED = 4  # a prefill-only request (max_tokens 0) read its text


class EngineStopped(Exception):
    pass


@dataclass
class Request:
    """One call on a model.

    ids: tokens to read before generating (may be empty when ``logits`` is given);
    state: start state, arrays (L, 1, H) float32, or None for zeros; logits: (V,) next-token logits when
    ``ids`` is empty; max_tokens 0 only reads ``ids`` (session append).
    """

    ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    state: list[np.ndarray] | None = None
    logits: np.ndarray | None = None


@dataclass
class Outcome:
    """How a stream ended: the counts, and the state to continue from (sessions).

    state: arrays (L, 1, H) float32; logits (V,) float32 when nothing is pending, else ``pending`` is the
    last generated token, which the model has not read yet.
    """

    finish: Finish
    prompt_tokens: int
    generated_tokens: int
    state: list[np.ndarray]
    logits: np.ndarray | None
    pending: int | None


class Stream:
    """A request in flight. Fields under "loop side" are touched by the event loop only."""

    def __init__(self, request: Request, submitted: float) -> None:
        self.request = request
        self.submitted = submitted
        self.cancelled = False  # set by the loop, read by the step thread
        # step-thread side
        self.remaining = list(request.ids)
        self.rng = request.params.generator()
        self.matcher = StopMatcher(request.stop)
        self.held = ""  # generated text not sent yet because it could begin a stop string
        self.generated = 0
        self.queued = True
        # loop side
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.wakeup = asyncio.Event()

    def take(self) -> tuple[str, list[int], list[float]]:
        """Everything produced since the last call (loop side)."""
        chunk = ("".join(self.text), self.token_ids, self.token_logprobs)
        self.text, self.token_ids, self.token_logprobs = [], [], []
        return chunk

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


# (stream, text, token ids, logprobs, outcome or error)
_Update = tuple[Stream, str, list[int], list[float], "Outcome | BaseException | None"]


def log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """logits: (B, V), ids: (B,) -> (B,) natural-log probability of each id."""
    z = logits.astype(np.float64)
    peak = z.max(axis=1, keepdims=True)
    norm = np.log(np.exp(z - peak).sum(axis=1)) + peak[:, 0]
    return z[np.arange(len(ids)), ids] - norm


class ModelEngine:
    """The step loop of one model. ``submit``/``cancel`` are called from the event loop."""

    def __init__(self, name: str, runtime: LMRuntime, metrics: ModelMetrics, max_batch: int = 256,
                 prefill_chunk: int = 256, flush_interval: float = 0.001, max_messages_per_s: float = 4000.0,
                 ) -> None:
        self.name = name
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.flush_interval = flush_interval
        self.max_messages_per_s = max_messages_per_s
        self._urgent = False
        self.eos = runtime.manifest.special_ids.get("<eos>")
        self._pieces = [runtime.tokenizer.piece(i, False) for i in range(runtime.vocab_size)]
        self._cond = threading.Condition()
        self._incoming: list[Stream] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # step-thread state
        self._prefilling: deque[Stream] = deque()
        self._ready: deque[tuple[Stream, list[np.ndarray], np.ndarray]] = deque()
        self._batch: list[Stream] = []
        self._state: list[np.ndarray] = runtime.init_state(0)
        self._logits = np.zeros((0, runtime.vocab_size), np.float32)
        self._options: tuple[np.ndarray, np.ndarray, np.ndarray] = self._row_options()
        self._last_step = 0.0

    # -- event-loop side ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the step loop; streams still running end with EngineStopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> Stream:
        stream = Stream(request, time.perf_counter())
        with self._cond:
            if self._stopping:
                raise EngineStopped(f"model {self.name!r} is shutting down")
            self._incoming.append(stream)
            self._cond.notify()
        return stream

    @staticmethod
    def cancel(stream: Stream) -> None:
        """The stream leaves the batch before the next step (its client went away)."""
        stream.cancelled = True

    # -- step thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        outbox: list[_Update] = []
        last_delivery = 0.0
        while True:
            with self._cond:
                while not (self._incoming or self._stopping or self._busy()):
                    self._cond.wait()
                if self._stopping:
                    break
                incoming, self._incoming = self._incoming, []
            self._urgent = False
            try:
                self._iterate(incoming, outbox)
            except Exception as exc:  # a failed ORT call must not kill the loop: fail this batch's streams
                log.exception("model %s: step failed", self.name)
                failed = dict.fromkeys([*incoming, *self._prefilling, *(s for s, _, _ in self._ready),
                                        *self._batch])  # admitted streams are in two of these lists
                outbox += [(s, "", [], [], exc) for s in failed if not s.cancelled]
                self._reset()
                self._urgent = True
            # Waking the event loop costs about as much as a small step, and every wake-up sends one gRPC
            # message per active stream (tens of µs of CPU each, in this process): wake it at most every
            # ``flush_interval``, and rarely enough that it sends at most ``max_messages_per_s``; first
            # tokens, ends, and the last update before going idle are sent at once.
            now = time.perf_counter()
            idle = not self._busy()
            interval = max(self.flush_interval, len(self._batch) / self.max_messages_per_s)
            if outbox and (self._urgent or idle or now - last_delivery >= interval):
                self._deliver(outbox)
                outbox, last_delivery = [], now
        stopped = EngineStopped(f"model {self.name!r} is shutting down")
        leftovers = [*self._incoming, *self._prefilling, *(s for s, _, _ in self._ready), *self._batch]
        self._deliver([*outbox, *((s, "", [], [], stopped) for s in leftovers)])

    def _busy(self) -> bool:
        return bool(self._prefilling or self._ready or self._batch)

    def _reset(self) -> None:
        self._prefilling.clear()
        self._ready.clear()
        self._batch = []
        self._state = self.runtime.init_state(0)
        self._logits = self._logits[:0]
        self._options = self._row_options()

    def _deliver(self, updates: list[_Update]) -> None:
        if updates and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self._loop.call_soon_threadsafe(_apply_updates, updates)

    def _iterate(self, incoming: list[Stream], updates: list[_Update]) -> None:
        for stream in incoming:
            request = stream.request
            if stream.remaining:
                self._prefilling.append(stream)
            else:
                self._ready.append((stream, request.state or self.runtime.init_state(1), request.logits))
        self._prefill_some(updates)
        self._decode_step(updates)

    def _prefill_some(self, updates: list[_Update]) -> None:
        """Reads up to ``prefill_chunk`` (rows x tokens) of prompts; equal chunk lengths share one call."""
        budget, groups = self.prefill_chunk, {}
        for stream in list(self._prefilling):
            if stream.cancelled:
                self._prefilling.remove(stream)
                continue
            length = min(len(stream.remaining), self.prefill_chunk)
            if groups and budget < length:
                break
            budget -= length
            groups.setdefault(length, []).append(stream)
            if sum(len(g) for g in groups.values()) >= self.max_batch:
                break
        now = time.perf_counter()
        for length, streams in groups.items():
            tokens = np.array([s.remaining[:length] for s in streams], dtype=np.int64)
            states = [s.request.state or self.runtime.init_state(1) for s in streams]
            state = [np.concatenate(parts, axis=1) for parts in zip(*states, strict=True)]
            for s in streams:
                if s.queued:
                    s.queued = False
                    self.metrics.queue.observe(now - s.submitted)
            logits, new_state = self.runtime.step(tokens, state)
            self.metrics.prompt_tokens.inc(tokens.size)
            for row, stream in enumerate(streams):
                del stream.remaining[:length]
                row_state = [np.ascontiguousarray(a[:, row:row + 1]) for a in new_state]
                if stream.remaining:
                    stream.request.state = row_state
                    continue
                self._prefilling.remove(stream)
                last = logits[row, -1].copy()
                if stream.request.max_tokens == 0:
                    outcome = Outcome(Finish.APPENDED, len(stream.request.ids), 0, row_state, last, None)
                    updates.append((stream, "", [], [], outcome))
                    self._urgent = True
                else:
                    self._ready.append((stream, row_state, last))

    def _row_options(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = [s.request.params for s in self._batch]
        return (np.array([p.temperature for p in params], np.float64),
                np.array([p.top_k for p in params], np.int64),
                np.array([p.top_p for p in params], np.float64))

    def _admit(self) -> None:
        """Removes cancelled rows and adds ready streams up to ``max_batch`` (vectorised gathers)."""
        keep = [i for i, s in enumerate(self._batch) if not s.cancelled]
        joining = []
        while self._ready and len(keep) + len(joining) < self.max_batch:
            entry = self._ready.popleft()
            if not entry[0].cancelled:
                joining.append(entry)
        if len(keep) == len(self._batch) and not joining:
            return
        state, logits = self._state, self._logits
        if len(keep) != len(self._batch):
            index = np.array(keep, dtype=np.int64)
            state = [np.take(a, index, axis=1) for a in state]
            logits = logits[index]
            self._batch = [self._batch[i] for i in keep]
        if joining:
            now = time.perf_counter()
            for stream, _, _ in joining:
                if stream.queued:
                    stream.queued = False
                    self.metrics.queue.observe(now - stream.submitted)
            rows = zip(*(row_state for _, row_state, _ in joining), strict=True)
            state = [np.concatenate([a, *parts], axis=1) for a, parts in zip(state, rows, strict=True)]
            logits = np.concatenate([logits, np.stack([row_logits for _, _, row_logits in joining])])
            self._batch += [stream for stream, _, _ in joining]
        self._state, self._logits = state, logits
        self._options = self._row_options()

    def _decode_step(self, updates: list[_Update]) -> None:
        self._admit()
        batch = self._batch
        if not batch:
            return
        temperature, top_k, top_p = self._options
        uniforms = np.array([0.0 if s.request.params.greedy else s.rng.random() for s in batch])
        logits = self._logits
        tokens = sample_next(logits, temperature, top_k, top_p, uniforms)
        want_lp = [i for i, s in enumerate(batch) if s.request.logprobs]
        logprobs = np.zeros(len(batch))
        if want_lp:
            logprobs[want_lp] = log_softmax_at(logits[want_lp], tokens[want_lp])
        now = time.perf_counter()
        self.metrics.batch.observe(len(batch))
        self.metrics.tokens.inc(len(batch))
        if self._last_step:
            self.metrics.inter_token.observe(now - self._last_step)
        finished = []
        for row, stream in enumerate(batch):
            token = int(tokens[row])
            finish = self._emit(stream, token, float(logprobs[row]), updates, now)
            if finish is not None:
                finished.append(row)
                outcome = Outcome(finish, len(stream.request.ids), stream.generated,
                                  [np.ascontiguousarray(a[:, row:row + 1]) for a in self._state], None, token)
                updates[-1] = (*updates[-1][:4], outcome)
                self._urgent = True
        if finished:
            keep = np.setdiff1d(np.arange(len(batch)), finished)
            self._batch = [batch[i] for i in keep]
            self._state = [np.take(a, keep, axis=1) for a in self._state]
            tokens = tokens[keep]
            self._options = self._row_options()
        if not self._batch:
            self._logits = self._logits[:0]
            self._last_step = 0.0
            return
        step_logits, self._state = self.runtime.step(tokens[:, None].astype(np.int64), self._state)
        self._logits = step_logits[:, 0]
        self._last_step = now

    def _emit(self, stream: Stream, token: int, logprob: float, updates: list[_Update],
              now: float) -> Finish | None:
        """Adds one generated token to the stream's update; returns why it finished, if it did."""
        if stream.generated == 0:
            self.metrics.ttft.observe(now - stream.submitted)
            self._urgent = True
        stream.generated += 1
        lps = [logprob] if stream.request.logprobs else []
        if token == self.eos:
            updates.append((stream, stream.held, [token], lps, None))
            return Finish.EOS
        held = stream.held + self._pieces[token]
        finish = None
        cut = stream.matcher.find(held) if stream.matcher.stops else None
        if cut is not None:
            text, stream.held, finish = held[:cut], "", Finish.STOP
        else:
            safe = stream.matcher.safe_length(held)
            text, stream.held = held[:safe], held[safe:]
            if stream.generated >= stream.request.max_tokens:
                text, stream.held, finish = held, "", Finish.LENGTH
        updates.append((stream, text, [token], lps, None))
        return finish


def _apply_updates(updates: list[_Update]) -> None:
    """On the event loop: appends each update to its stream's buffer and wakes its writer."""
    for stream, text, token_ids, logprobs, end in updates:
        if text:
            stream.text.append(text)
        stream.token_ids += token_ids
        stream.token_logprobs += logprobs
        if isinstance(end, Outcome):
            stream.outcome = end
        elif end is not None:
            stream.error = end
        stream.wakeup.set()
