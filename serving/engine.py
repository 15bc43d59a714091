"""Continuous batching: one step loop per model runs every active stream as one batched ORT call.

A model's loop runs on a thread of its own, so that onnxruntime and the per-step numpy work stay off the
event loop. Each iteration

1. drops cancelled streams and admits new ones;
2. reads prompts ("prefill") over the time axis for a bounded number of prompt tokens, joiners with equal
   remaining lengths batched together, so a long prompt never stalls decoding for long;
3. runs one decode step for the batch: sample the next token of every row (``serving.sampling.sample_next``
   with each row's own options and uniforms from each stream's own generator), log the tokens, retire
   finished streams, and feed the others' tokens to the model in one (B, 1) call.

The batch state lives in the (L, B, ...) arrays onnxruntime returned for the previous step: a step whose
membership did not change feeds them back without a copy; joins and leaves gather rows with one vectorised
``np.take``/``np.concatenate`` per state tensor.

The per-step work is vectorised across the batch (per-row options, counters and pre-drawn uniforms live in
(B,) arrays; a step appends its (B,) tokens to a log); only rows with stop strings do per-token Python
work. At a hand-over the logged steps become one update per stream (token ids, text looked up from the
vocabulary's pieces, logprobs, end), all of them carried to the event loop by one ``call_soon_threadsafe``
just before the step's ORT call, so that the event loop sends while ORT runs without the GIL. Hand-overs
are rate-limited (see ``_flush``); a stream's first token and its end go at once, without the other
streams' tokens. On the loop, updates accumulate in each stream's buffer; the stream's writer sends
everything accumulated as one message, so a slow reader receives larger messages instead of holding the
batch back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from serving.metrics import ModelMetrics
from serving.prompt_cache import PromptCache
from serving.runtime import LMRuntime
from serving.sampling import SamplingParams, StopMatcher, sample_next, sample_unfiltered, unfiltered

log = logging.getLogger(__name__)

# Uniforms drawn from a stream's generator at a time: ``rng.random(n)`` yields the same sequence as n calls
# of ``rng.random()``, so a seeded stream samples exactly as before, with one draw per row every n steps.
_DRAWS = 32


class Finish(Enum):
    LENGTH = 1
    STOP = 2
    EOS = 3
    APPENDED = 4  # a prefill-only request (max_tokens 0) read its text


class EngineStopped(Exception):
    pass


class RequestRejected(ValueError):
    """A request that would fail the whole batch (an id outside the vocabulary, a state of another shape):
    refused at ``submit``, so that only its own call fails."""


@dataclass
class Request:
    """One call on a model.

    ids: tokens to read before generating (may be empty when ``logits`` is given);
    state: start state, arrays (L, 1, ...) float32, or None for zeros; logits: (V,) next-token logits when
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

    state: arrays (L, 1, ...) float32; logits (V,) float32 when nothing is pending, else ``pending`` is the
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

    rng: np.random.Generator  # sampling streams only; made by the step thread (``_iterate``), off the loop

    def __init__(self, request: Request, submitted: float) -> None:
        self.request = request
        self.submitted = submitted
        self.cancelled = False  # set by the loop, read by the step thread
        self.fresh = request.state is None  # read from the initial state: the prompt cache may keep its state
        # step-thread side
        self.remaining = list(request.ids)
        self.matcher = StopMatcher(request.stop)
        self.held = ""  # generated text not sent yet because it could begin a stop string
        self.unsent: list[str] = []  # text of a stream with stop strings, produced since the last hand-over
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


class _Rows:
    """Per-row arrays of the decode batch; row i belongs to the batch's stream i (B rows).

    temperature, top_p: (B,) float64; top_k, limit (max_tokens), count (tokens generated so far): (B,)
    int64; stops, logprobs: (B,) bool (the row has stop strings / wants logprobs); uniforms: (B, _DRAWS)
    float64, pre-drawn from each row's own generator, column ``cursor`` (shared by all rows) being the
    next; a row that joins at cursor c draws only columns c and on, so every stream consumes its draws in
    order, one per step, as ``sample_one`` does.
    """

    _FIELDS = ("temperature", "top_k", "top_p", "limit", "count", "stops", "logprobs", "uniforms")

    def __init__(self, vocab: int, streams: Sequence[Stream] = (), cursor: int = 0) -> None:
        params = [s.request.params for s in streams]
        self.vocab, self.cursor = vocab, cursor
        self.temperature = np.array([p.temperature for p in params], np.float64)
        self.top_k = np.array([p.top_k for p in params], np.int64)
        self.top_p = np.array([p.top_p for p in params], np.float64)
        self.limit = np.array([s.request.max_tokens for s in streams], np.int64)
        self.count = np.zeros(len(streams), np.int64)
        self.stops = np.array([bool(s.matcher.stops) for s in streams], bool)
        self.logprobs = np.array([s.request.logprobs for s in streams], bool)
        self.uniforms = np.zeros((len(streams), _DRAWS))
        self._derive()
        for row in self.sampling:
            self.uniforms[row, cursor:] = streams[row].rng.random(_DRAWS - cursor)

    def _derive(self) -> None:
        """Row lists and flags that change only with membership."""
        self.sampling = np.flatnonzero(self.temperature > 0).tolist()
        self.stop_rows = np.flatnonzero(self.stops).tolist()
        self.unfiltered = bool(unfiltered(self.temperature, self.top_k, self.top_p, self.vocab).all())
        self.any_logprobs = bool(self.logprobs.any())

    def _with(self, fields: dict[str, np.ndarray]) -> _Rows:
        rows = object.__new__(_Rows)
        rows.vocab, rows.cursor = self.vocab, self.cursor
        rows.__dict__.update(fields)
        rows._derive()
        return rows

    def take(self, index: np.ndarray) -> _Rows:
        """The rows at ``index`` (K,) int64, in that order."""
        return self._with({name: getattr(self, name)[index] for name in self._FIELDS})

    def extend(self, other: _Rows) -> _Rows:
        """These rows followed by ``other``'s (made at the same cursor)."""
        return self._with(
            {name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in self._FIELDS}
        )

    def next_uniforms(self, batch: Sequence[Stream]) -> np.ndarray:
        """(B,) this step's uniform of every row, 0 for greedy rows (they draw nothing, as ``sample_one``)."""
        if self.cursor == _DRAWS:
            for row in self.sampling:
                self.uniforms[row] = batch[row].rng.random(_DRAWS)
            self.cursor = 0
        self.cursor += 1
        return self.uniforms[:, self.cursor - 1]


@dataclass
class _Pending:
    """What a stream produced since its last update: text pieces, token ids, logprobs, and its end."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    end: Outcome | None = None


@dataclass
class _Step:
    """One decode step's tokens, logged until the next hand-over to the event loop.

    batch: the step's B streams (a new list whenever membership changes, so steps sharing the list object
    share their rows); tokens: (B,) int64; logprobs: (B,) float64, or None when no row asked for them.
    """

    batch: list[Stream]
    tokens: np.ndarray
    logprobs: np.ndarray | None


def log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """logits: (B, V), ids: (B,) -> (B,) natural-log probability of each id."""
    z = logits.astype(np.float64)
    peak = z.max(axis=1, keepdims=True)
    norm = np.log(np.exp(z - peak).sum(axis=1)) + peak[:, 0]
    return z[np.arange(len(ids)), ids] - norm


class ModelEngine:
    """The step loop of one model. ``submit``/``cancel`` are called from the event loop."""

    def __init__(
        self,
        name: str,
        runtime: LMRuntime,
        metrics: ModelMetrics,
        max_batch: int = 256,
        prefill_chunk: int = 256,
        flush_interval: float = 0.001,
        max_messages_per_s: float = 2000.0,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.flush_interval = flush_interval
        self.max_messages_per_s = max_messages_per_s
        self.prompt_cache = PromptCache() if prompt_cache is None else prompt_cache
        self.eos = runtime.manifest.special_ids.get("<eos>")
        self._pieces = [runtime.tokenizer.piece(i, False) for i in range(runtime.vocab_size)]
        # (V,) object: the text each token adds to a stream without stop strings (EOS ends it, adding none)
        self._texts = np.array(self._pieces, dtype=object)
        if self.eos is not None:
            self._texts[self.eos] = ""
        self._cond = threading.Condition()
        self._incoming: list[Stream] = []
        self._cancellations = False  # set after a stream's ``cancelled``: rescan the batch
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # step-thread state
        self._prefilling: deque[Stream] = deque()
        self._ready: deque[tuple[Stream, list[np.ndarray], np.ndarray]] = deque()
        self._batch: list[Stream] = []
        self._state: list[np.ndarray] = runtime.init_state(0)
        self._logits = np.zeros((0, runtime.vocab_size), np.float32)
        self._rows = _Rows(runtime.vocab_size)
        self._last_step = 0.0
        self._steps: list[_Step] = []  # decode steps not collected yet
        self._ends: dict[Stream, Outcome] = {}  # streams that ended in those steps
        self._pending: dict[Stream, _Pending] = {}  # collected, not handed over yet
        self._urgent: set[Stream] = set()  # streams whose pending update goes at once: first token, end
        self._state_shapes = [a.shape for a in runtime.init_state(1)]

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
        self._check(request)
        stream = Stream(request, time.perf_counter())
        with self._cond:
            if self._stopping:
                raise EngineStopped(f"model {self.name!r} is shutting down")
            self._incoming.append(stream)
            self._cond.notify()
        return stream

    def _check(self, request: Request) -> None:
        """Raises RequestRejected for what would break the batched step of every stream of this model."""
        vocab = self.runtime.vocab_size
        if request.ids and (min(request.ids) < 0 or max(request.ids) >= vocab):
            bad = min(request.ids) if min(request.ids) < 0 else max(request.ids)
            raise RequestRejected(f"token id {bad} out of range [0, {vocab})")
        if request.state is not None and [a.shape for a in request.state] != self._state_shapes:
            raise RequestRejected("state arrays do not fit the model")
        if request.logits is not None and request.logits.shape != (vocab,):
            raise RequestRejected(f"logits must have shape ({vocab},)")

    def cancel(self, stream: Stream) -> None:
        """The stream leaves the batch before the next step (its client went away)."""
        stream.cancelled = True
        self._cancellations = True  # after the stream's flag, so the step thread's scan sees both

    # -- step thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        events: list[_Update] = []  # updates other than tokens (prompts read, failures): sent at once
        last_delivery = 0.0
        while (incoming := self._wait_for_work()) is not None:
            tokens = None
            try:
                tokens = self._iterate(incoming, events)
            except Exception as exc:  # a failed ORT call must not kill the loop: fail this batch's streams
                self._fail(incoming, events, exc)
            # Handing over just before the ORT call lets the event loop send while ORT runs without the GIL.
            last_delivery = self._flush(events, last_delivery)
            if tokens is not None:
                try:
                    self._advance(tokens)
                except Exception as exc:
                    self._fail([], events, exc)
                    last_delivery = self._flush(events, last_delivery)  # nothing else would wake the loop
        stopped = EngineStopped(f"model {self.name!r} is shutting down")
        leftovers = [*self._incoming, *self._prefilling, *(s for s, _, _ in self._ready), *self._batch]
        self._hand_over([*events, *((s, "", [], [], stopped) for s in leftovers)], everything=True)

    def _wait_for_work(self) -> list[Stream] | None:
        """The streams submitted since the last call, once there is anything to do; None when stopping."""
        with self._cond:
            while not (self._incoming or self._stopping or self._busy()):
                self._cond.wait()
            if self._stopping:
                return None
            incoming, self._incoming = self._incoming, []
            return incoming

    def _flush(self, events: list[_Update], last_delivery: float) -> float:
        """Hands over what is due, and the events (emptying the list); returns the last full hand-over's time.

        Waking the event loop costs about as much as a small step, and every update sends one gRPC message
        (tens of µs of CPU each, in this process, holding the GIL the step loop needs): everything goes at
        most every ``flush_interval``, and rarely enough that at most ``max_messages_per_s`` are sent. First
        tokens, ends and events go at once, but alone, so that streams joining or leaving do not make every
        other stream send a message too. Going idle hands everything over.
        """
        now = time.perf_counter()
        interval = max(self.flush_interval, len(self._batch) / self.max_messages_per_s)
        if not self._busy() or now - last_delivery >= interval:
            self._hand_over(events, everything=True)
            last_delivery = now
        elif events or self._urgent:
            self._hand_over(events, everything=False)
        events.clear()
        return last_delivery

    def _fail(self, incoming: list[Stream], events: list[_Update], exc: Exception) -> None:
        """Fails every stream of the model that has not finished, and starts afresh."""
        log.exception("model %s: step failed", self.name)
        failed = dict.fromkeys(
            [*incoming, *self._prefilling, *(s for s, _, _ in self._ready), *self._batch]
        )  # admitted streams are in two of these lists
        events += [(s, "", [], [], exc) for s in failed if not s.cancelled]
        self._reset()

    def _busy(self) -> bool:
        return bool(self._prefilling or self._ready or self._batch)

    def _reset(self) -> None:
        self._prefilling.clear()
        self._ready.clear()
        self._batch = []
        self._state = self.runtime.init_state(0)
        self._logits = self._logits[:0]
        self._rows = _Rows(self.runtime.vocab_size)
        self._last_step = 0.0

    def _deliver(self, updates: list[_Update]) -> None:
        if updates and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self._loop.call_soon_threadsafe(_apply_updates, updates)

    def _iterate(self, incoming: list[Stream], events: list[_Update]) -> np.ndarray | None:
        """Admits, reads prompts and samples a decode step; returns the tokens (B,) the batch reads next."""
        for stream in incoming:
            request = stream.request
            if not request.params.greedy:
                stream.rng = request.params.generator()
            if not stream.remaining:
                self._ready.append((stream, request.state or self.runtime.init_state(1), request.logits))
            elif stream.fresh and (cached := self.prompt_cache.get(request.ids)) is not None:
                self.metrics.prompt_cache_hits.inc()
                stream.remaining = []
                self._prompt_read(stream, *cached, events)
            else:
                self._prefilling.append(stream)
        self._prefill_some(events)
        return self._decode_step()

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
                row_state = [np.ascontiguousarray(a[:, row : row + 1]) for a in new_state]
                if stream.remaining:
                    stream.request.state = row_state
                    continue
                self._prefilling.remove(stream)
                last = logits[row, -1].copy()
                if stream.fresh:
                    self.prompt_cache.put(stream.request.ids, row_state, last)
                self._prompt_read(stream, row_state, last, updates)

    def _prompt_read(
        self, stream: Stream, state: list[np.ndarray], logits: np.ndarray, updates: list[_Update]
    ) -> None:
        """A stream whose prompt is read (state (L, 1, ...) arrays, next logits (V,)) decodes, or ends if it
        only appends."""
        if stream.request.max_tokens == 0:
            outcome = Outcome(Finish.APPENDED, len(stream.request.ids), 0, state, logits, None)
            updates.append((stream, "", [], [], outcome))
        else:
            self._ready.append((stream, state, logits))

    def _admit(self) -> int:
        """Removes cancelled rows and adds ready streams up to ``max_batch`` (vectorised gathers); returns
        how many streams joined, at the end of the batch."""
        keep = range(len(self._batch))
        if self._cancellations:  # scanning every row every step would cost ~10 µs at B = 64
            self._cancellations = False
            keep = [i for i, s in enumerate(self._batch) if not s.cancelled]
        joining = []
        while self._ready and len(keep) + len(joining) < self.max_batch:
            entry = self._ready.popleft()
            if not entry[0].cancelled:
                joining.append(entry)
        if len(keep) == len(self._batch) and not joining:
            return 0
        state, logits, rows = self._state, self._logits, self._rows
        if len(keep) != len(self._batch):
            index = np.array(keep, dtype=np.int64)
            state = [np.take(a, index, axis=1) for a in state]
            logits, rows = logits[index], rows.take(index)
            self._batch = [self._batch[i] for i in keep]
        if joining:
            now = time.perf_counter()
            streams = [stream for stream, _, _ in joining]
            for stream in streams:
                if stream.queued:
                    stream.queued = False
                    self.metrics.queue.observe(now - stream.submitted)
            parts = zip(*(row_state for _, row_state, _ in joining), strict=True)
            state = [np.concatenate([a, *more], axis=1) for a, more in zip(state, parts, strict=True)]
            logits = np.concatenate([logits, np.stack([row_logits for _, _, row_logits in joining])])
            rows = rows.extend(_Rows(rows.vocab, streams, rows.cursor))
            self._batch = [*self._batch, *streams]  # a new list: logged steps keep the old membership
        self._state, self._logits, self._rows = state, logits, rows
        return len(joining)

    def _decode_step(self) -> np.ndarray | None:
        """Samples a token for every row, logs them and retires finished rows; returns the remaining rows'
        tokens (B',) int64, which ``_advance`` feeds to the model, or None when no row remains."""
        joined = self._admit()
        batch, rows = self._batch, self._rows
        if not batch:
            return None
        logits, uniforms = self._logits, rows.next_uniforms(batch)
        if rows.unfiltered:
            tokens = sample_unfiltered(logits, rows.temperature, uniforms)
        else:
            tokens = sample_next(logits, rows.temperature, rows.top_k, rows.top_p, uniforms)
        now = time.perf_counter()
        self._observe_step(batch, joined, now)
        rows.count += 1
        self._steps.append(_Step(batch, tokens, self._logprobs(logits, tokens, rows)))
        finished = self._finishes(batch, tokens, rows)
        if finished:
            keep = self._retire(batch, tokens, rows, finished)
            tokens = tokens[keep]
        if not self._batch:
            self._logits = self._logits[:0]
            self._last_step = 0.0
            return None
        self._last_step = now
        return tokens

    def _advance(self, tokens: np.ndarray) -> None:
        """Feeds the batch its tokens (B,) in one (B, 1) ORT call: next logits (B, V) and state."""
        step_logits, self._state = self.runtime.step(tokens[:, None].astype(np.int64), self._state)
        self._logits = step_logits[:, 0]

    def _observe_step(self, batch: list[Stream], joined: int, now: float) -> None:
        """Step metrics, and the time to first token of the ``joined`` last rows (their first token)."""
        for stream in batch[len(batch) - joined :]:
            self.metrics.ttft.observe(now - stream.submitted)
            self._urgent.add(stream)
        self.metrics.batch.observe(len(batch))
        self.metrics.tokens.inc(len(batch))
        if self._last_step:
            self.metrics.inter_token.observe(now - self._last_step)

    @staticmethod
    def _logprobs(logits: np.ndarray, tokens: np.ndarray, rows: _Rows) -> np.ndarray | None:
        """logits: (B, V), tokens: (B,) -> (B,) log-probability of each token (0 for rows that did not ask),
        or None when no row asked."""
        if not rows.any_logprobs:
            return None
        want = rows.logprobs
        out = np.zeros(len(tokens))
        out[want] = log_softmax_at(logits[want], tokens[want])
        return out

    def _finishes(self, batch: list[Stream], tokens: np.ndarray, rows: _Rows) -> list[tuple[int, Finish]]:
        """The rows that end with this step's tokens (B,), and why.

        Rows without stop strings end on EOS or at their length, found for the whole batch at once; rows
        with stop strings go through ``_stop_text`` token by token.
        """
        eos = tokens == (-1 if self.eos is None else self.eos)
        ends = (eos | (rows.count >= rows.limit)) & ~rows.stops
        finished = [(row, Finish.EOS if eos[row] else Finish.LENGTH) for row in np.flatnonzero(ends).tolist()]
        for row in rows.stop_rows:
            finish = self._stop_text(batch[row], int(tokens[row]), int(rows.count[row]))
            if finish is not None:
                finished.append((row, finish))
        return finished

    def _stop_text(self, stream: Stream, token: int, generated: int) -> Finish | None:
        """Adds a token of a stream with stop strings to its unsent text; returns why it finished, if it did.

        Text that could begin a stop string is held back until it cannot; a stop string and what follows
        are never sent.
        """
        if token == self.eos:
            stream.unsent.append(stream.held)
            return Finish.EOS
        held = stream.held + self._pieces[token]
        cut = stream.matcher.find(held)
        if cut is not None:
            text, stream.held, finish = held[:cut], "", Finish.STOP
        elif generated >= stream.request.max_tokens:
            text, stream.held, finish = held, "", Finish.LENGTH
        else:
            safe = stream.matcher.safe_length(held)
            text, stream.held, finish = held[:safe], held[safe:], None
        stream.unsent.append(text)
        return finish

    def _retire(
        self, batch: list[Stream], tokens: np.ndarray, rows: _Rows, finished: list[tuple[int, Finish]]
    ) -> np.ndarray:
        """Records the outcome of the finished rows and drops them; returns the kept rows (K,) int64.

        An outcome's state is the row's state before this step: its last token is pending, not read.
        """
        for row, finish in finished:
            stream = batch[row]
            state = [np.ascontiguousarray(a[:, row : row + 1]) for a in self._state]
            self._ends[stream] = Outcome(
                finish, len(stream.request.ids), int(rows.count[row]), state, None, int(tokens[row])
            )
            self._urgent.add(stream)
        keep = np.setdiff1d(np.arange(len(batch)), [row for row, _ in finished])
        self._batch = [batch[i] for i in keep]
        self._state = [np.take(a, keep, axis=1) for a in self._state]
        self._rows = rows.take(keep)
        return keep

    def _collect(self) -> None:
        """Moves the logged steps into each stream's pending update; ends ride along.

        Consecutive steps with the same membership are stacked into (B, S) and split per row at once.
        """
        for _, group in itertools.groupby(self._steps, key=lambda step: id(step.batch)):
            run = list(group)
            tokens = np.stack([step.tokens for step in run], axis=1)
            texts = self._texts[tokens].tolist()
            logprobs = (
                np.stack([step.logprobs for step in run], axis=1).tolist()
                if run[0].logprobs is not None
                else None
            )
            for row, (stream, ids) in enumerate(zip(run[0].batch, tokens.tolist(), strict=True)):
                pending = self._pending.get(stream)
                if pending is None:
                    pending = self._pending[stream] = _Pending()
                pending.ids += ids
                if stream.matcher.stops:
                    pending.text += stream.unsent
                    stream.unsent = []
                else:
                    pending.text += texts[row]
                if logprobs is not None and stream.request.logprobs:
                    pending.logprobs += logprobs[row]
        self._steps = []
        for stream, outcome in self._ends.items():
            self._pending[stream].end = outcome
        self._ends = {}

    def _hand_over(self, events: list[_Update], everything: bool) -> None:
        """Delivers the pending updates (all, or the urgent and the events' streams'), then the events."""
        self._collect()
        if everything:
            chosen, self._pending = self._pending, {}
        else:
            wanted = self._urgent.union(stream for stream, *_ in events)
            chosen = {stream: self._pending.pop(stream) for stream in wanted if stream in self._pending}
        self._urgent.clear()
        updates = [(stream, "".join(p.text), p.ids, p.logprobs, p.end) for stream, p in chosen.items()]
        self._deliver([*updates, *events])


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
