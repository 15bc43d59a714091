"""Running an exported language-model bundle with onnxruntime alone (no torch).

The step graph maps (tokens (B, T) int64, state tensors) to (logits (B, T, V), the next state). The state
tensors are the manifest's: each float32 with the layers on axis 0 and the symbolic "batch" axis on axis 1,
e.g. h (L, B, H) [, c (L, B, H)] for the RNN cells, conv (L, B, k − 1, C) and ssm (L, B, heads, P, N) for
mamba.
Inputs are validated here, before ``InferenceSession.run``, so bad ids or states raise a ValueError that
names the tensor instead of failing inside onnxruntime. Bundles may add a "decode" graph for T = 1 (see
lm/decode_graph.py); ``step`` picks it by itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.bundle import BundleError, Manifest, load_manifest
from serving.sampling import SamplingParams
from serving.stateful_decoder import StatefulDecoder
from serving.streaming import sample_ids, stream_text
from serving.tokenizers import load_tokenizer

# dtype instances: ``dtype != np.int64`` converts the type on every call, and validation runs every step.
_INT64, _FLOAT32 = np.dtype(np.int64), np.dtype(np.float32)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(bool)": "bool"}


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One intra-op thread by default (the server runs one batched call at a time per model)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def open_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({exc})") from None


def _raw_run(session: ort.InferenceSession) -> Callable[[list[str], dict, None], list[np.ndarray]]:
    """The session's compiled ``run(output_names, feed, run_options)``.

    ``InferenceSession.run`` first re-checks the feed in Python, ~1.5 µs a call: 4 % of a batch-1 decode
    step. ``LMRuntime.validate`` has checked more by then, so the runtime calls the compiled method
    underneath (same arguments, same results); a build without it falls back to the public one.
    """
    return getattr(session, "_sess", session).run


def _id_range(tokens: np.ndarray) -> tuple[int, int]:
    """(min, max) of the ids. This runs every step, right after an ORT call has evicted numpy's reduction
    machinery from the caches: a reduction then costs ~8 µs, a list of a few hundred ids ~1 µs."""
    if tokens.size <= 1024:
        ids = tokens.ravel().tolist()
        return min(ids), max(ids)
    return int(tokens.min()), int(tokens.max())


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    return type(value).__name__


def _check_session_tensor(kind: str, arg: ort.NodeArg, shape: Sequence[int | str], dtype: str,
                          path: Path) -> None:
    """The graph's declared tensor agrees with the manifest (symbolic axes may have any name)."""
    got_dtype = _ORT_DTYPES.get(arg.type, arg.type)
    if got_dtype != dtype:
        raise BundleError(f"{path}: {kind} {arg.name!r} has dtype {got_dtype}, manifest says {dtype}")
    got = list(arg.shape)
    ok = len(got) == len(shape) and all(
        isinstance(want, str) or got_dim == want for got_dim, want in zip(got, shape, strict=True))
    if not ok:
        raise BundleError(f"{path}: {kind} {arg.name!r} has shape {got}, manifest says {list(shape)}")


class LMRuntime:
    """A loaded LM bundle: tokenizer + one ORT session over the step graph.

    ``step`` is the batched primitive the server uses; ``prefill``/``generate``/``perplexity`` are the
    single-stream conveniences behind ``rnnlab-lm generate BUNDLE`` and the tests. A bundle may carry a
    second graph, role "decode", that ``step`` uses whenever T = 1.
    """

    def __init__(self, manifest: Manifest, session: ort.InferenceSession, threads: int = 1,
                 decode_session: ort.InferenceSession | None = None) -> None:
        self.manifest = manifest
        self.session = session
        self.decode_session = decode_session
        self.threads = threads
        try:
            self.tokenizer = load_tokenizer(manifest.file(str(manifest.tokenizer)))
        except ValueError as exc:  # the message names the file
            raise BundleError(str(exc)) from None
        arch = manifest.architecture
        self.vocab_size = int(arch["vocab_size"])
        self.layers = int(arch["layers"])
        self.hidden = int(arch["hidden"])
        self.state_names: tuple[str, ...] = manifest.state_names
        self._state_shapes: dict[int, list[tuple[int, ...]]] = {}  # batch -> each state tensor's shape
        self.state_output_names: list[str] = [s.output or f"{s.name}_out" for s in manifest.state]
        self._output_names = ["logits", *self.state_output_names]
        self._eos = manifest.special_ids.get("<eos>")
        self._run_sequence = _raw_run(session)
        self.token_session = decode_session if decode_session is not None else session  # runs T = 1
        self._run_token = _raw_run(self.token_session)

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int = 1) -> LMRuntime:
        """Verifies the bundle (checksums, version, graph tensors against the manifest) and opens it."""
        manifest = load_manifest(bundle_dir)
        if manifest.kind != "lm":
            raise BundleError(f"{manifest.path}: a {manifest.kind!r} bundle, not a language model")
        arch = manifest.architecture
        for key in ("vocab_size", "layers", "hidden"):
            if not isinstance(arch.get(key), int) or arch[key] < 1:
                raise BundleError(f"{manifest.where}: architecture.{key} missing or invalid")
        if not manifest.state:
            raise BundleError(f"{manifest.where}: no state tensors listed")
        graph = manifest.graph("step")
        decode = manifest.graph("decode") if "decode" in manifest.graphs else None
        runtime = cls(manifest, open_session(graph, threads), threads,
                      open_session(decode, threads) if decode is not None else None)
        runtime._check_graph(runtime.session, graph, "time")
        if decode is not None:
            runtime._check_graph(runtime.decode_session, decode, 1)
        if runtime.tokenizer.vocab_size != runtime.vocab_size:
            raise BundleError(f"{manifest.file(str(manifest.tokenizer))}: tokenizer has "
                              f"{runtime.tokenizer.vocab_size} tokens, the model {runtime.vocab_size}")
        return runtime

    def _check_graph(self, session: ort.InferenceSession, path: Path, time: str | int) -> None:
        """The graph's tensors are the manifest's: tokens (B, time), state, logits (B, time, V)."""
        inputs = {a.name: a for a in session.get_inputs()}
        outputs = {a.name: a for a in session.get_outputs()}
        want_in = {"tokens": (("batch", time), "int64")}
        want_out = {"logits": (("batch", time, self.vocab_size), "float32")}
        for spec, out_name in zip(self.manifest.state, self.state_output_names, strict=True):
            shape = spec.shape
            fixed = [d for k, d in enumerate(shape) if k != 1]
            if (len(shape) < 3 or shape[0] != self.layers or shape[1] != "batch"
                    or not all(isinstance(d, int) for d in fixed) or spec.dtype != "float32"):
                raise BundleError(f"{self.manifest.path / 'manifest.json'}: state {spec.name!r} "
                                  f"{list(shape)} {spec.dtype} is not [{self.layers}, batch, ...] float32")
            want_in[spec.name] = (spec.shape, spec.dtype)
            want_out[out_name] = (spec.shape, spec.dtype)
        for kind, have, want in (("input", inputs, want_in), ("output", outputs, want_out)):
            if set(have) != set(want):
                raise BundleError(f"{path}: graph {kind}s {sorted(have)} differ from "
                                  f"the manifest's {sorted(want)}")
            for name, (shape, dtype) in want.items():
                _check_session_tensor(kind, have[name], shape, dtype, path)

    # -- the batched primitive -------------------------------------------------------------------

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Each state tensor's shape for ``batch`` streams: the manifest's, "batch" (axis 1) filled in."""
        shapes = self._state_shapes.get(batch)
        if shapes is None:
            shapes = [spec.concrete_shape(batch=batch) for spec in self.manifest.state]
            if len(self._state_shapes) < 1024:  # batch sizes seen; bounded all the same
                self._state_shapes[batch] = shapes
        return shapes

    def init_state(self, batch: int) -> list[np.ndarray]:
        """Zero state: one float32 array per state tensor, e.g. (L, B, H)."""
        return [np.zeros(shape, dtype=np.float32) for shape in self.state_shapes(batch)]

    def validate(self, tokens: np.ndarray, state: Sequence[np.ndarray]) -> None:
        """Raises ValueError naming the tensor when tokens (B, T) or the state do not fit the graph.

        Runs before every step, straight after an ORT call has evicted the interpreter's working set
        from the caches, so the common case takes as few Python operations as it can (~1 µs).
        """
        if not isinstance(tokens, np.ndarray) or tokens.dtype != _INT64 or tokens.ndim != 2:
            raise ValueError(f"tokens must be a (batch, time) int64 array, got {_describe(tokens)}")
        batch, time = tokens.shape
        if batch < 1 or time < 1:
            raise ValueError(f"tokens must have batch and time >= 1, got shape {tokens.shape}")
        self.check_ids(tokens)
        if len(state) != len(self.state_names):
            raise ValueError(f"state: expected {len(self.state_names)} tensors {self.state_names}, "
                             f"got {len(state)}")
        for value, want in zip(state, self.state_shapes(batch), strict=True):
            if not isinstance(value, np.ndarray) or value.dtype != _FLOAT32 or value.shape != want:
                self._raise_bad_state(state, batch)

    def check_ids(self, tokens: np.ndarray) -> None:
        """Raises ValueError unless every id in the integer array ``tokens`` is in [0, vocab_size)."""
        low, high = _id_range(tokens)
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"tokens: id {low if low < 0 else high} out of range [0, {self.vocab_size})")

    def _raise_bad_state(self, state: Sequence[np.ndarray], batch: int) -> None:
        for name, value, want in zip(self.state_names, state, self.state_shapes(batch), strict=True):
            if not isinstance(value, np.ndarray) or value.dtype != _FLOAT32 or value.shape != want:
                raise ValueError(f"state {name!r}: expected float32 {want}, got {_describe(value)}")

    def step(self, tokens: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens: (B, T) int64, state: float32 arrays (L, B, ...) -> (logits (B, T, V) float32, state')."""
        self.validate(tokens, state)
        feed = dict(zip(self.state_names, state, strict=True))
        feed["tokens"] = tokens
        run = self._run_token if tokens.shape[1] == 1 else self._run_sequence
        logits, *new_state = run(self._output_names, feed, None)
        return logits, new_state

    # -- single-stream conveniences --------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prefill(self, ids: Sequence[int], state: Sequence[np.ndarray] | None = None,
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runs the whole prompt in one call over the time axis -> (last logits (V,), state for batch 1)."""
        if len(ids) == 0:
            raise ValueError("prompt: empty (no tokens to condition on)")
        tokens = np.asarray(ids, dtype=np.int64)[None, :]
        logits, new_state = self.step(tokens, self.init_state(1) if state is None else state)
        return logits[0, -1], new_state

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
                     ) -> Iterator[int]:
        """Yields up to ``max_tokens`` sampled ids, stopping after <eos> if the vocabulary has one."""
        logits, state = self.prefill(prompt_ids)
        decoder = StatefulDecoder(self, state)
        yield from sample_ids(logits, lambda token_id: decoder.step([token_id])[0], max_tokens, params,
                              self._eos)

    def generate(self, prompt: str, max_tokens: int, params: SamplingParams | None = None,
                 stop: Sequence[str] = ()) -> Iterator[str]:
        """Streams the text pieces of a continuation of ``prompt`` (see serving.streaming.stream_text)."""
        ids = self.generate_ids(self.encode(prompt), max_tokens, params or SamplingParams())
        return stream_text(ids, self.tokenizer, stop, self._eos)

    def perplexity(self, text: str, chunk: int = 256) -> dict:
        """Perplexity of ``text`` under the model, predicting tokens 2..N with state carried across chunks.

        -> {"perplexity", "nll" (mean per token, nats), "bits_per_char", "tokens", "characters"}.
        """
        ids = np.asarray(self.encode(text), dtype=np.int64)
        if len(ids) < 2:
            raise ValueError("text: needs at least two tokens to measure perplexity")
        state = self.init_state(1)
        total = 0.0
        for start in range(0, len(ids) - 1, chunk):
            inputs = ids[start:min(start + chunk, len(ids) - 1)]
            targets = ids[start + 1:start + 1 + len(inputs)]
            logits, state = self.step(inputs[None, :], state)
            z = logits[0].astype(np.float64)
            peak = z.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(z - peak).sum(axis=1)) + peak[:, 0]
            total += float((log_norm - z[np.arange(len(targets)), targets]).sum())
        count = len(ids) - 1
        chars = max(1, len(self.tokenizer.decode(ids[1:].tolist())))
        return {"perplexity": math.exp(total / count), "nll": total / count,
                "bits_per_char": total / math.log(2) / chars, "tokens": count, "characters": chars}
