"""Translating with an exported seq2seq bundle: onnxruntime + numpy + serving.tokenizers, no torch.

The bundle holds two graphs (see seq2seq/export.py)::

    encoder.onnx       src (B,S) int64, src_len (B,) int64 -> projected_memory (B,M,G) f32,
                                                 [keys (B,M,A) f32, mask (B,M) bool,] state (L,B,H) f32
    decoder_step.onnx  prev (B,) int64, k (1,) int64, state (L,B,H), projected_memory, [keys, mask]
                                       -> log_probs (B,k) f32, ids (B,k) int64 (best first), state_out (L,B,H)

``OrtStepDecoder`` is the ``serving.search.StepDecoder`` over these graphs: greedy and beam search
are the code that also drives the torch model (``serving.search``), and the text front end
(normalisation, sentencepiece, per-line failures, length-sorted batches) is ``serving.frontend``'s,
so both translators decide alike by construction; the export checks it on sample sentences and
tests/serving/test_translator.py on a trained model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.bundle import BundleError, Manifest, load_manifest
from serving.frontend import TextTranslator, Translation, pad_batch
from serving.runtime import open_session
from serving.search import Hypothesis, SearchParams, beam_search, greedy_search
from serving.text import normalize
from serving.tokenizers import SentencePieceTokenizer, load_tokenizer

__all__ = ["Hypothesis", "OrtStepDecoder", "SearchParams", "Seq2SeqRuntime", "Translation"]

ENCODER, DECODER = "encoder", "decoder_step"
# keys: the attention keys, computed once per sentence by the encoder; without attention there are no
# keys, and the decoder step (which then reads a single memory slot) takes no mask either.
ENCODER_INPUTS, ENCODER_OUTPUTS = ("src", "src_len"), ("projected_memory", "keys", "mask", "state")
DECODER_INPUTS = ("prev", "k", "state", "projected_memory", "keys", "mask")
DECODER_OUTPUTS = ("log_probs", "ids", "state_out")
PLAIN_ENCODER_OUTPUTS, PLAIN_DECODER_INPUTS = ("projected_memory", "state"), DECODER_INPUTS[:4]

Memory = dict[str, np.ndarray]
"""The decoder's per-sentence inputs from the encoder, by graph input name; row axis 0."""


class OrtStepDecoder:
    """``StepDecoder`` over decoder_step.onnx: state (L,N,H) array, memory {input name: (N,...) array}."""

    def __init__(self, session: ort.InferenceSession, vocab: int) -> None:
        self.session, self.vocab = session, vocab

    def step(self, prev: np.ndarray, state: np.ndarray, memory: Memory, k: int,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """prev (N,) int64 -> log_probs (N,k') float64, ids (N,k') int64, state (L,N,H); k' = min(k, V)."""
        k_in = np.array([min(k, self.vocab)], dtype=np.int64)
        log_probs, ids, state = self.session.run(None, {"prev": prev, "k": k_in, "state": state, **memory})
        return log_probs.astype(np.float64), ids, state

    def select_state(self, state: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return state[:, rows]

    def select_memory(self, memory: Memory, rows: np.ndarray) -> Memory:
        return {name: x[rows] for name, x in memory.items()}


class Seq2SeqRuntime(TextTranslator):
    """A loaded seq2seq bundle: tokenizers, the encoder and decoder-step ORT sessions, batched search.

    ``encoder_calls`` counts encoder runs and ``encoder_rows`` the sentences they held (the batching
    figures the translation service reports). Batches may be searched from several threads at once
    (``search(..., workers=N)``): onnxruntime sessions allow concurrent runs, and each run of a
    one-thread session computes on its caller's thread.
    """

    def __init__(self, manifest: Manifest, encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                 ) -> None:
        tokenizers = manifest.tokenizer if isinstance(manifest.tokenizer, dict) else {}
        preprocessing = manifest.data.get("preprocessing") or {}
        self.lowercase = bool(preprocessing.get("lowercase", False))
        super().__init__(_spm(manifest, tokenizers.get("source")), _spm(manifest, tokenizers.get("target")),
                         int(preprocessing.get("max_src_tokens", 128)),
                         lambda text: normalize(text, self.lowercase))
        self.manifest = manifest
        self.encoder = encoder
        arch = manifest.architecture
        self.src_vocab, self.tgt_vocab = int(arch["src_vocab"]), int(arch["tgt_vocab"])
        self.pad = int(arch.get("pad_id", 0))
        self.decoder = OrtStepDecoder(decoder, self.tgt_vocab)
        self.encoder_calls = 0
        self.encoder_rows = 0
        self._count_lock = threading.Lock()
        self._encoder_outputs = [a.name for a in encoder.get_outputs()]
        self._memory_names = [a.name for a in decoder.get_inputs()][3:]

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int = 1) -> Seq2SeqRuntime:
        """Verifies the bundle (checksums, kind, graph signatures, vocabularies) and opens both graphs."""
        manifest = load_manifest(bundle_dir)
        where = manifest.where
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
        runtime = cls(manifest, encoder, decoder)
        for role, tok, size in (("source", runtime.src_tokenizer, runtime.src_vocab),
                                ("target", runtime.tgt_tokenizer, runtime.tgt_vocab)):
            if tok.vocab_size != size:
                raise BundleError(f"{where}: {role} tokenizer has {tok.vocab_size} tokens, the model {size}")
        return runtime

    @property
    def name(self) -> str:
        return self.manifest.name

    def encode(self, src: np.ndarray, src_len: np.ndarray) -> tuple[Memory, np.ndarray]:
        """src (B,S) int64, src_len (B,) int64 >= 1 -> the decoder's memory inputs (row b = sentence b:
        projected_memory (B,M,G) [, keys (B,M,A), mask (B,M)]), state (L,B,H)."""
        with self._count_lock:
            self.encoder_calls += 1
            self.encoder_rows += len(src)
        outputs = dict(zip(self._encoder_outputs, self.encoder.run(None, {"src": src, "src_len": src_len}),
                           strict=True))
        return {name: outputs[name] for name in self._memory_names}, outputs["state"]

    def search_batch(self, sources: list[list[int]], params: SearchParams) -> list[list[Hypothesis]]:
        """One batch of source id lists (EOS included, non-empty) -> ``params.n_best`` hypotheses each."""
        src, src_len = pad_batch(sources, self.pad)
        memory, state = self.encode(src, src_len)
        if params.beam == 1:
            return [[hyp] for hyp in greedy_search(self.decoder, state, memory, src_len, self.bos, self.eos,
                                                   params)]
        return beam_search(self.decoder, state, memory, src_len, self.bos, self.eos, params)


def _spm(manifest: Manifest, relpath: str | None) -> SentencePieceTokenizer:
    where = manifest.where
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
