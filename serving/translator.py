"""Translating with an exported seq2seq bundle: onnxruntime + numpy + lm.tokenizers, no torch.

The bundle holds three graphs (see seq2seq/export.py)::

    encoder.onnx       src (B,S) int64, src_len (B,) int64 -> memory (B,M,C) f32, [keys (B,M,A) f32,]
                                                                 mask (B,M) bool, state (L,B,H) f32
    decoder_step.onnx  prev (B,) int64, state (L,B,H), memory, [keys, mask]
                                                              -> logits (B,V) f32, state_out (L,B,H)
    topk.onnx          logits (N,V) f32, k (1,) int64 -> log_probs (N,k) f32, ids (N,k) int64
                       (TopK of the logits, lower id first on ties; their LogSoftmax values)

Greedy and beam search here make exactly the decisions of ``seq2seq.search`` (the torch decoder's
search), vectorised over the sentences of a batch instead of looping over them: the same candidate
order (score, then lower candidate index), the same handling of end tokens (only among the first K
candidates), the same per-sentence length limit, the same GNMT length penalty and n-best ranking.
Only the K*2K candidates that can reach a sentence's best 2K are scored: each row's 2K best tokens
(the topk graph; a row's order by logit is its order by log-probability), so no (N,V) array is
handled in numpy. ``SearchParams``, ``Hypothesis``, the length penalty and the source normalisation
are the torch-free ones of ``seq2seq.search`` and ``seq2seq.data``, shared with the torch decoder;
tests/serving/test_translator.py checks that both searches agree on a trained model.

Source text goes through the training normalisation (NFC, spaces) before sentencepiece, as in
``seq2seq.decode.Translator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lm.tokenizers import SentencePieceTokenizer, load_tokenizer
from seq2seq.data import normalize
from seq2seq.search import Hypothesis, SearchParams, length_normalize
from serving.bundle import BundleError, Manifest, load_manifest
from serving.runtime import open_session

BOS, EOS = "<bos>", "<eos>"
ENCODER, DECODER, TOPK = "encoder", "decoder_step", "topk"
# keys: the attention keys, computed once per sentence by the encoder; without attention there are no
# keys, and the decoder step (which then reads a single memory slot) takes no mask either.
ENCODER_INPUTS, ENCODER_OUTPUTS = ("src", "src_len"), ("memory", "keys", "mask", "state")
DECODER_INPUTS, DECODER_OUTPUTS = ("prev", "state", "memory", "keys", "mask"), ("logits", "state_out")
PLAIN_ENCODER_OUTPUTS, PLAIN_DECODER_INPUTS = ("memory", "mask", "state"), ("prev", "state", "memory")
TOPK_INPUTS, TOPK_OUTPUTS = ("logits", "k"), ("log_probs", "ids")


@dataclass
class Translation:
    text: str
    """The best hypothesis, detokenised ("" when the line failed)."""
    n_best: list[tuple[str, float]]
    """(text, normalised score) best first; empty when the line failed."""
    error: str | None = None
    warning: str | None = None
    hypotheses: tuple[Hypothesis, ...] = ()
    source_tokens: int = 0
    """Source length in sentencepiece tokens, EOS not counted (0 when the line failed)."""


def pad_batch(sources: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (B, max len) int64 padded with ``pad``, lengths (B,) int64."""
    lengths = np.array([len(s) for s in sources], dtype=np.int64)
    ids = np.full((len(sources), int(lengths.max())), pad, dtype=np.int64)
    for row, seq in enumerate(sources):
        ids[row, : len(seq)] = seq
    return ids, lengths


class Seq2SeqRuntime:
    """A loaded seq2seq bundle: tokenizers, the encoder and decoder-step ORT sessions, batched search.

    ``encoder_calls`` counts encoder runs and ``encoder_rows`` the sentences they held (the batching
    figures the translation service reports).
    """

    def __init__(self, manifest: Manifest, encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                 topk: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.encoder, self.decoder, self.topk = encoder, decoder, topk
        tokenizers = manifest.tokenizer if isinstance(manifest.tokenizer, dict) else {}
        self.src_tokenizer = _spm(manifest, tokenizers.get("source"))
        self.tgt_tokenizer = _spm(manifest, tokenizers.get("target"))
        arch = manifest.architecture
        self.src_vocab, self.tgt_vocab = int(arch["src_vocab"]), int(arch["tgt_vocab"])
        self.pad = int(arch.get("pad_id", 0))
        self.bos, self.eos = self.tgt_tokenizer.special_ids[BOS], self.tgt_tokenizer.special_ids[EOS]
        self.src_eos = self.src_tokenizer.special_ids[EOS]
        self.unk = self.src_tokenizer.special_ids["<unk>"]
        preprocessing = manifest.data.get("preprocessing") or {}
        self.lowercase = bool(preprocessing.get("lowercase", False))
        self.max_src_tokens = int(preprocessing.get("max_src_tokens", 128))
        self.encoder_calls = 0
        self.encoder_rows = 0
        self._encoder_outputs = [a.name for a in encoder.get_outputs()]
        self._memory_names = [a.name for a in decoder.get_inputs()][2:]

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int = 1) -> Seq2SeqRuntime:
        """Verifies the bundle (checksums, kind, graph signatures, vocabularies) and opens both graphs."""
        manifest = load_manifest(bundle_dir)
        where = manifest.path / "manifest.json"
        if manifest.kind != "seq2seq":
            raise BundleError(f"{manifest.path}: a {manifest.kind!r} bundle, not a translator")
        for key in ("src_vocab", "tgt_vocab", "layers", "dec_hidden"):
            if not isinstance(manifest.architecture.get(key), int) or manifest.architecture[key] < 1:
                raise BundleError(f"{where}: architecture.{key} missing or invalid")
        encoder = open_session(manifest.graph(ENCODER), threads)
        decoder = open_session(manifest.graph(DECODER), threads)
        attention = "keys" in {a.name for a in encoder.get_outputs()}
        _check_names(encoder, manifest.graph(ENCODER), ENCODER_INPUTS,
                     ENCODER_OUTPUTS if attention else PLAIN_ENCODER_OUTPUTS)
        _check_names(decoder, manifest.graph(DECODER), DECODER_INPUTS if attention else PLAIN_DECODER_INPUTS,
                     DECODER_OUTPUTS)
        topk = open_session(manifest.graph(TOPK), threads)
        _check_names(topk, manifest.graph(TOPK), TOPK_INPUTS, TOPK_OUTPUTS)
        runtime = cls(manifest, encoder, decoder, topk)
        for role, tok, size in (("source", runtime.src_tokenizer, runtime.src_vocab),
                                ("target", runtime.tgt_tokenizer, runtime.tgt_vocab)):
            if tok.vocab_size != size:
                raise BundleError(f"{where}: {role} tokenizer has {tok.vocab_size} tokens, the model {size}")
        logits = decoder.get_outputs()[0].shape
        if logits[-1] != runtime.tgt_vocab:
            raise BundleError(f"{manifest.graph(DECODER)}: logits have {logits[-1]} classes, "
                              f"manifest says {runtime.tgt_vocab}")
        return runtime

    @property
    def name(self) -> str:
        return self.manifest.name

    # --- graphs --------------------------------------------------------------------------------------
    def encode(self, src: np.ndarray, src_len: np.ndarray) -> tuple[Memory, np.ndarray]:
        """src (B,S) int64, src_len (B,) int64 >= 1 -> the decoder's memory inputs (row b = sentence b:
        memory (B,M,C) [, keys (B,M,A), mask (B,M)]), state (L,B,H)."""
        self.encoder_calls += 1
        self.encoder_rows += len(src)
        outputs = dict(zip(self._encoder_outputs, self.encoder.run(None, {"src": src, "src_len": src_len}),
                           strict=True))
        return {name: outputs[name] for name in self._memory_names}, outputs["state"]

    def decode_step(self, prev: np.ndarray, state: np.ndarray, memory: Memory,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """prev (N,) int64, state (L,N,H), memory rows -> logits (N,V) float32, state (L,N,H)."""
        logits, state = self.decoder.run(None, {"prev": prev, "state": state, **memory})
        return logits, state

    def top(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """logits (N,V) -> log-probabilities (N,k) float64 and ids (N,k) of each row's k best tokens,
        best first (equal logits: lower id first)."""
        log_probs, ids = self.topk.run(None, {"logits": logits, "k": np.array([k], dtype=np.int64)})
        return log_probs.astype(np.float64), ids

    # --- search --------------------------------------------------------------------------------------
    def search_batch(self, sources: list[list[int]], params: SearchParams) -> list[list[Hypothesis]]:
        """One batch of source id lists (EOS included, non-empty) -> ``params.n_best`` hypotheses each."""
        src, src_len = pad_batch(sources, self.pad)
        memory, state = self.encode(src, src_len)
        limits = np.array([params.max_len(int(n)) for n in src_len], dtype=np.int64)
        if params.beam == 1:
            return [[h] for h in greedy(self.decode_step, self.top, state, memory, limits, self.bos, self.eos,
                                        params)]
        return beam(self.decode_step, self.top, state, memory, limits, self.bos, self.eos, params)

    def search(self, sources: list[list[int]], params: SearchParams, batch_size: int = 64,
               ) -> list[list[Hypothesis]]:
        """Any number of sources in length-sorted batches (as seq2seq.decode.search); input order out."""
        order = sorted(range(len(sources)), key=lambda i: (len(sources[i]), i))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for index, hyps in zip(chunk, self.search_batch([sources[i] for i in chunk], params),
                                   strict=True):
                results[index] = hyps
        return results

    # --- text ----------------------------------------------------------------------------------------
    def encode_source(self, text: str) -> tuple[list[int], str | None]:
        """Text -> (ids + EOS, warning or None); raises ValueError (one line) for an untranslatable line."""
        text = normalize(text, self.lowercase)
        if not text:
            raise ValueError("empty line")
        ids = self.src_tokenizer.encode(text)
        if len(ids) > self.max_src_tokens:
            raise ValueError(f"too long: {len(ids)} tokens (limit {self.max_src_tokens})")
        warning = None
        if self.unk in ids:
            pieces = self.src_tokenizer.sp.encode(text, out_type=str)
            unknown = [p for p, i in zip(pieces, ids, strict=True) if i == self.unk]
            warning = f"unknown to the model, translated as <unk>: {' '.join(unknown)!r}"
        return [*ids, self.src_eos], warning

    def finish(self, hyps: list[Hypothesis], source_tokens: int, warning: str | None = None) -> Translation:
        """Hypotheses of one sentence -> its Translation (detokenised n-best)."""
        n_best = [(self.tgt_tokenizer.decode(list(h.tokens)), h.normalized) for h in hyps]
        return Translation(n_best[0][0], n_best, warning=warning, hypotheses=tuple(hyps),
                           source_tokens=source_tokens)

    def translate(self, texts: list[str], params: SearchParams | None = None, batch_size: int = 64,
                  ) -> list[Translation]:
        """One Translation per text, failures included (``error`` set, empty text); greedy by default."""
        params = params or SearchParams()
        results: list[Translation | None] = [None] * len(texts)
        good, sources, warnings = [], [], []
        for i, text in enumerate(texts):
            try:
                ids, warning = self.encode_source(text)
            except ValueError as exc:
                results[i] = Translation("", [], str(exc))
                continue
            good.append(i)
            sources.append(ids)
            warnings.append(warning)
        for i, ids, hyps, warning in zip(good, sources, self.search(sources, params, batch_size), warnings,
                                         strict=True):
            results[i] = self.finish(hyps, len(ids) - 1, warning)
        return results  # type: ignore[return-value]


Memory = dict[str, np.ndarray]
"""The decoder's per-sentence inputs from the encoder, by graph input name; row axis 0."""
StepFn = Callable[[np.ndarray, np.ndarray, Memory], tuple[np.ndarray, np.ndarray]]
TopFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _top(top: TopFn, logits: np.ndarray, width: int, eos: int, eos_allowed: bool,
         ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``width`` best (log-probability, id), best first; without EOS when not allowed
    (its log-probability counts as -inf, as in seq2seq.search)."""
    if eos_allowed:
        return top(logits, width)
    log_probs, ids = top(logits, min(width + 1, logits.shape[1]))
    log_probs = np.where(ids == eos, -np.inf, log_probs)
    order = np.argsort(-log_probs, axis=1, kind="stable")[:, :width]  # EOS last, the others keep order
    return np.take_along_axis(log_probs, order, axis=1), np.take_along_axis(ids, order, axis=1)


def greedy(step: StepFn, top: TopFn, state: np.ndarray, memory: Memory, limits: np.ndarray, bos: int,
           eos: int, params: SearchParams) -> list[Hypothesis]:
    """Arg-max decoding of B sentences: state (L,B,H), memory rows (B,...), limits (B,).

    A sentence leaves the batch when it emits EOS or reaches its limit (seq2seq.search.greedy_search).
    """
    alpha = params.length_penalty
    count = len(limits)
    outputs = np.zeros((count, int(limits.max()) if count else 0), dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    scores = np.zeros(count, dtype=np.float64)
    results: list[Hypothesis | None] = [None] * count
    alive = np.arange(count)
    prev = np.full(count, bos, dtype=np.int64)
    step_no = 0
    while len(alive):
        step_no += 1
        logits, state = step(prev, state, memory)
        # the arg-max token (first on ties) and its log-probability
        log_probs, ids = _top(top, logits, 1, eos, step_no > params.min_len)
        tokens = ids[:, 0]
        scores[alive] += log_probs[:, 0]
        ended = tokens == eos
        going = alive[~ended]
        outputs[going, lengths[going]] = tokens[~ended]
        lengths[going] += 1
        keep = ~ended & (lengths[alive] < limits[alive])
        for row in np.flatnonzero(~keep):
            sentence, done = int(alive[row]), bool(ended[row])
            score, length = float(scores[sentence]), int(lengths[sentence])
            results[sentence] = Hypothesis(tuple(outputs[sentence, :length].tolist()), score,
                                           length_normalize(score, length + done, alpha), done)
        if 0 < keep.sum() < len(alive):
            state, memory = state[:, keep], {name: x[keep] for name, x in memory.items()}
        alive, prev = alive[keep], tokens[keep].astype(np.int64)
    return results  # type: ignore[return-value]


def beam(step: StepFn, top: TopFn, state: np.ndarray, memory: Memory, limits: np.ndarray, bos: int, eos: int,
         params: SearchParams) -> list[list[Hypothesis]]:
    """Beam search of B sentences, K rows each (seq2seq.search.beam_search, vectorised).

    Per step the live scores (n,R) plus log-probabilities give (n, R*V) candidates; each sentence's
    2K best in (score desc, index asc) order are read as in ``_advance``: an EOS among the first K
    finishes a hypothesis, the first K others form the next beam (padded to K with dead rows).
    R = K rows per sentence, except at the first step: there the torch search's K-1 other rows are
    dead (score -inf, never chosen), so only one row per sentence is computed.
    """
    k, count = params.beam, len(limits)
    alpha = params.length_penalty
    finished: list[list[Hypothesis]] = [[] for _ in range(count)]
    alive = np.arange(count)
    rows = 1
    scores = np.zeros((count, rows))
    history = np.zeros((count, rows, 0), dtype=np.int64)
    step_memory = memory  # memory: one row per live sentence; step_memory: R rows per sentence
    prev = np.full(count, bos, dtype=np.int64)
    step_no = 0
    while len(alive):
        step_no += 1
        logits, state = step(prev, state, step_memory)
        vocab, n = logits.shape[1], len(alive)
        width = min(2 * k, vocab)
        # A sentence's best 2K candidates are among its rows' best 2K.
        log_probs, ids = _top(top, logits, width, eos, step_no > params.min_len)
        candidates = (scores[:, :, None] + log_probs.reshape(n, rows, width)).reshape(n, rows * width)
        index = (np.arange(rows)[None, :, None] * vocab + ids.reshape(n, rows, width)).reshape(n, -1)
        order = np.lexsort((index, -candidates), axis=1)[:, :min(2 * k, rows * width)]
        best = np.take_along_axis(index, order, axis=1)
        best_scores = np.take_along_axis(candidates, order, axis=1)
        origin, token = np.divmod(best, vocab)
        ranks = best.shape[1]
        live = best_scores > -np.inf
        is_eos = token == eos
        ends = live & is_eos & (np.arange(ranks) < k)[None, :]
        for slot, rank in zip(*np.nonzero(ends), strict=True):
            score = float(best_scores[slot, rank])
            finished[alive[slot]].append(Hypothesis(tuple(history[slot, origin[slot, rank]].tolist()), score,
                                                    length_normalize(score, step_no, alpha), True))
        going = live & ~is_eos
        chosen = going & (np.cumsum(going, axis=1) <= k)
        n_chosen = chosen.sum(axis=1)
        picks = np.argsort(~chosen, axis=1, kind="stable")[:, :k]  # chosen ranks first, in rank order
        new_origin = np.take_along_axis(origin, picks, axis=1)
        new_token = np.take_along_axis(token, picks, axis=1)
        new_scores = np.take_along_axis(best_scores, picks, axis=1)
        new_history = np.concatenate(
            [np.take_along_axis(history, new_origin[:, :, None], axis=1), new_token[:, :, None]], axis=2)
        n_finished = np.array([len(finished[s]) for s in alive])
        done = (n_finished >= k) | (step_no >= limits[alive]) | (n_chosen == 0)
        for slot in np.flatnonzero(done & (n_finished < k)):
            hyps = finished[alive[slot]]
            for j in range(int(n_chosen[slot])):
                score = float(new_scores[slot, j])
                hyps.append(Hypothesis(tuple(new_history[slot, j].tolist()), score,
                                       length_normalize(score, step_no, alpha), False))
        keep = ~done
        if not keep.any():
            break
        # A beam narrower than K keeps K rows: the missing ones repeat the first, with score -inf.
        pad = np.arange(k)[None, :] >= n_chosen[:, None]
        new_origin = np.where(pad, new_origin[:, :1], new_origin)
        new_token = np.where(pad, new_token[:, :1], new_token)
        new_scores = np.where(pad, -np.inf, new_scores)
        new_history = np.where(pad[:, :, None], new_history[:, :1], new_history)
        slots = np.flatnonzero(keep)
        state = state[:, (slots[:, None] * rows + new_origin[slots]).reshape(-1)]
        alive = alive[slots]
        if len(slots) < n or rows == 1:  # a sentence's K rows share its memory: copy it only when needed
            memory = {name: x[slots] for name, x in memory.items()}
            step_memory = {name: np.repeat(x, k, axis=0) for name, x in memory.items()}
        rows = k
        scores, history = new_scores[slots], new_history[slots]
        prev = new_token[slots].reshape(-1)
    return [_n_best(hyps, params.n_best) for hyps in finished]


def _n_best(finished: list[Hypothesis], n_best: int) -> list[Hypothesis]:
    ranked = sorted(enumerate(finished), key=lambda item: (-item[1].normalized, item[0]))
    return [hyp for _, hyp in ranked[:n_best]]


def _spm(manifest: Manifest, relpath: str | None) -> SentencePieceTokenizer:
    where = manifest.path / "manifest.json"
    if relpath is None:
        raise BundleError(f"{where}: 'tokenizer' must name the source and target tokenizer files")
    try:
        tokenizer = load_tokenizer(manifest.file(relpath))
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{manifest.file(relpath)}: not a readable tokenizer ({exc})") from None
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise BundleError(f"{manifest.file(relpath)}: translators need sentencepiece tokenizers")
    return tokenizer


def _check_names(session: ort.InferenceSession, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 ) -> None:
    """The graph's tensor names, in order."""
    got_in = tuple(a.name for a in session.get_inputs())
    got_out = tuple(a.name for a in session.get_outputs())
    if got_in != inputs or got_out != outputs:
        raise BundleError(f"{path}: graph has inputs {list(got_in)} and outputs {list(got_out)}, "
                          f"expected {list(inputs)} -> {list(outputs)}")
