"""Export a trained translator to an ONNX bundle that ``serving.translator`` runs without torch.

Two graphs, both from the legacy (TorchScript) exporter: a bidirectional GRU gets its time axis
frozen by the dynamo exporter (DESIGN.md, known pitfalls), and the legacy one turns the encoder's
packed sequences into the ONNX GRU's ``sequence_lens``::

    encoder.onnx       src (B,S) int64, src_len (B,) int64 -> memory (B,M,C), keys (B,M,A), mask (B,M) bool,
                                                            state (L,B,H)
    decoder_step.onnx  prev (B,) int64, state (L,B,H), memory, keys, mask -> logits (B,V), state_out (L,B,H)

``keys`` are the projected attention keys, computed once per sentence by the encoder (the model's
``encode`` returns them inside ``enc_out``; the graphs keep them apart, because slicing them out of
``enc_out`` in every step costs onnxruntime a copy, ~15 % of a step). Without attention the memory is
one slot, and there are no keys and no decoder mask input. A third, tiny graph, ``topk.onnx`` (built
with onnx.helper), gives the search each row's k best tokens and their log-probabilities, so the
runtime never handles (rows, vocabulary) arrays in numpy.

Before anything is published: (1) both graphs are run in onnxruntime against torch at several batch
sizes and source lengths (logits, states and encoder outputs within ``PARITY_TOLERANCE``), and (2) the
onnxruntime translator and the torch decoder translate sample sentences greedily and with a beam, and
must produce identical tokens. Otherwise ExportError says by how much, and nothing is written.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from lm.export import OPSET, PARITY_TOLERANCE, ExportError
from lm.tokenizers import save_tokenizer
from seq2seq.decode import search as torch_search
from seq2seq.model import Seq2Seq
from seq2seq.search import SearchParams
from serving.bundle import publish_bundle, staging_dir, write_manifest
from serving.runtime import open_session
from serving.translator import (
    DECODER,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    PLAIN_DECODER_INPUTS,
    PLAIN_ENCODER_OUTPUTS,
    TOPK,
    TOPK_INPUTS,
    TOPK_OUTPUTS,
    Seq2SeqRuntime,
)
from serving.translator import SearchParams as OrtSearchParams

ENCODER_FILE, DECODER_FILE, TOPK_FILE = "encoder.onnx", "decoder_step.onnx", "topk.onnx"
IR_VERSION = 8  # onnx.helper's default IR version is newer than some onnxruntime releases accept
SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE = "src_tokenizer.json", "tgt_tokenizer.json"
# (batch, source length) of the graph parity cases; lengths inside a batch vary down to 1.
PARITY_SHAPES = ((1, 1), (1, 9), (3, 5), (4, 17), (8, 30))
PARITY_STEPS = 4
SEARCH_BEAM = 4
SAMPLE_SENTENCES = 64
DEFAULT_SENTENCES = ("Hello.", "I am cold.", "Where is the station?", "We will see you tomorrow.",
                     "She does not like tea.", "Tom is reading a book in the garden.", "Go!",
                     "Can you help me, please?")


@dataclass
class ParityReport:
    """Worst absolute differences between onnxruntime and torch over all graph cases."""

    max_abs_encoder: float
    max_abs_logits: float
    max_abs_state: float
    worst_case: str
    cases: int

    @property
    def worst(self) -> float:
        return max(self.max_abs_encoder, self.max_abs_logits, self.max_abs_state)

    def to_dict(self) -> dict:
        return {"max_abs_encoder": self.max_abs_encoder, "max_abs_logits": self.max_abs_logits,
                "max_abs_state": self.max_abs_state, "worst_case": self.worst_case, "cases": self.cases}


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, ...]:
        enc_out, mask, state = self.model.encode(src, src_len)
        memory, keys = self.model._split(enc_out)
        return (memory, mask, state) if keys is None else (memory, keys, mask, state)


class DecoderStepGraph(nn.Module):
    """``Seq2Seq.decode_step`` (eval mode) on memory and keys passed apart."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, prev: Tensor, state: Tensor, memory: Tensor, keys: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        embedded = self.model.tgt_embed(prev)
        output, context, state = self.model._step(embedded, state, memory, keys, mask)
        return self.model._readout(output, context, embedded), state


def graph_names(model: Seq2Seq) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(encoder outputs, decoder inputs): without attention no keys, and no decoder mask."""
    if model.config.attention == "none":
        return PLAIN_ENCODER_OUTPUTS, PLAIN_DECODER_INPUTS
    return ENCODER_OUTPUTS, DECODER_INPUTS


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2: the TorchScript exporter's C++ warnings about PackPadded shapes."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _export(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
            dynamic_axes: dict) -> None:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet_stderr(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation, RNN batch-size and PackPadded shape warnings
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(inputs), output_names=list(outputs), dynamic_axes=dynamic_axes)
    onnx.checker.check_model(str(path))


def export_graphs(model: Seq2Seq, encoder_path: Path, decoder_path: Path) -> None:
    """Writes both graphs of an eval-mode model, with dynamic batch, source length and memory axes."""
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]], dtype=torch.int64).clamp_(max=model.config.src_vocab - 1)
    src_len = torch.tensor([4, 2], dtype=torch.int64)
    encoder_outputs, decoder_inputs = graph_names(model)
    memory = {name: {0: "batch", 1: "memory"} for name in ("memory", "keys", "mask")}
    _export(EncoderGraph(model), (src, src_len), encoder_path, ENCODER_INPUTS, encoder_outputs,
            {"src": {0: "batch", 1: "src_time"}, "src_len": {0: "batch"}, "state": {1: "batch"},
             **{name: memory[name] for name in encoder_outputs if name in memory}})
    with torch.no_grad():
        outputs = dict(zip(encoder_outputs, EncoderGraph(model)(src, src_len), strict=True))
    prev = torch.tensor([2, 2], dtype=torch.int64)
    args = (prev, *(outputs[name] for name in decoder_inputs[1:]))
    _export(DecoderStepGraph(model), args, decoder_path, decoder_inputs, DECODER_OUTPUTS,
            {"prev": {0: "batch"}, "state": {1: "batch"}, "logits": {0: "batch"}, "state_out": {1: "batch"},
             **{name: memory[name] for name in decoder_inputs if name in memory}})


def build_topk_graph(path: Path, vocab: int) -> None:
    """The search's candidate graph: logits (N,V), k (1,) -> log_probs (N,k), ids (N,k).

    TopK runs on the logits (a row's order by logit is its order by log-probability; ties: lower id
    first, as the torch search's lexsort), and the ids' LogSoftmax values are gathered.
    """
    from onnx import TensorProto, helper

    logits, k = TOPK_INPUTS
    log_probs, ids = TOPK_OUTPUTS
    nodes = [helper.make_node("TopK", [logits, k], ["top_logits", ids], axis=1, largest=1, sorted=1),
             helper.make_node("LogSoftmax", [logits], ["all_log_probs"], axis=1),
             helper.make_node("GatherElements", ["all_log_probs", ids], [log_probs], axis=1)]
    graph = helper.make_graph(
        nodes, "topk", [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", vocab]),
                        helper.make_tensor_value_info(k, TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(log_probs, TensorProto.FLOAT, ["batch", "k"]),
         helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "k"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="rnnlab seq2seq.export")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _max_diff(got: np.ndarray, want: Tensor) -> float:
    want_np = want.numpy()
    if got.shape != want_np.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float64) - want_np.astype(np.float64))
    return float(diff.max()) if diff.size and np.isfinite(diff).all() else (0.0 if not diff.size else np.inf)


def check_parity(model: Seq2Seq, encoder_path: Path, decoder_path: Path,
                 shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES, seed: int = 0) -> ParityReport:
    """Random sources of each (batch, length) with varied lengths, then PARITY_STEPS decoder steps fed
    the torch encoder's outputs and random previous tokens; max abs differences per tensor kind."""
    encoder, decoder = open_session(encoder_path), open_session(decoder_path)
    encoder_outputs, decoder_inputs = graph_names(model)
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    worst = {"encoder": 0.0, "logits": 0.0, "state": 0.0}
    worst_case, worst_value, cases = "", -1.0, 0
    for batch, length in shapes:
        src_len = torch.randint(1, length + 1, (batch,), generator=gen)
        src_len[0] = max(1, length - 1) if batch > 2 else length  # also a batch padded beyond its longest
        src = torch.randint(min(4, config.src_vocab - 1), config.src_vocab, (batch, length), generator=gen)
        src = src.masked_fill(torch.arange(length)[None, :] >= src_len[:, None], config.pad_id)
        with torch.no_grad():
            enc_out, mask, state = model.encode(src, src_len)
        memory, keys = model._split(enc_out)
        want = {"memory": memory, "keys": keys, "mask": mask, "state": state}
        got = dict(zip(encoder_outputs, encoder.run(None, {"src": src.numpy(), "src_len": src_len.numpy()}),
                       strict=True))
        diffs = {"encoder": max(0.0 if np.array_equal(got[name], want[name].numpy()) else np.inf
                                if name == "mask" else _max_diff(got[name], want[name]) for name in got)}
        diffs["logits"] = diffs["state"] = 0.0
        for _ in range(PARITY_STEPS):
            prev = torch.randint(0, config.tgt_vocab, (batch,), generator=gen)
            with torch.no_grad():
                logits, new_state = model.decode_step(prev, state, enc_out, mask)
            feed = {**want, "prev": prev, "state": state}
            out = decoder.run(None, {name: feed[name].numpy() for name in decoder_inputs})
            diffs["logits"] = max(diffs["logits"], _max_diff(out[0], logits))
            diffs["state"] = max(diffs["state"], _max_diff(out[1], new_state))
            state = new_state
        cases += 1
        for key, value in diffs.items():
            worst[key] = max(worst[key], value)
        if max(diffs.values()) > worst_value:
            worst_value, worst_case = max(diffs.values()), f"B={batch} S={length}"
    return ParityReport(worst["encoder"], worst["logits"], worst["state"], worst_case, cases)


def check_search(model: Seq2Seq, runtime: Seq2SeqRuntime, sentences: list[str], beam: int = SEARCH_BEAM,
                 ) -> dict:
    """Greedy and beam-``beam`` tokens of torch and onnxruntime on the sentences; ExportError on any
    difference. -> {"sentences", "greedy_identical", "beam_identical"}."""
    sources = []
    for text in sentences:
        try:
            sources.append(runtime.encode_source(text)[0])
        except ValueError:
            continue
    if not sources:
        raise ExportError("no usable sentence for the search check (all empty or too long)")
    report: dict = {"sentences": len(sources), "beam": beam}
    for label, k in (("greedy", 1), ("beam", beam)):
        ours = runtime.search(sources, OrtSearchParams(beam=k, n_best=k))
        theirs = torch_search(model, sources, SearchParams(beam=k, n_best=k), runtime.bos, runtime.eos)
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                  if [h.tokens for h in a] != [h.tokens for h in b]]
        if differ:
            i = differ[0]
            raise ExportError(
                f"onnxruntime and torch {label} search differ on {len(differ)} of {len(sources)} sentences "
                f"(first: {sentences[i]!r}: {list(ours[i][0].tokens)} vs {list(theirs[i][0].tokens)}); "
                "bundle not written")
        report[f"{label}_identical"] = len(sources)
    return report


def _architecture(model: Seq2Seq) -> dict:
    c = model.config
    return {"type": "seq2seq", "cell": "gru", **c.to_dict(), "memory_features": c.memory_features,
            "attention_keys_from_encoder": c.attention == "additive"}


def _signatures(model: Seq2Seq) -> dict:
    c = model.config
    encoder_outputs, decoder_inputs = graph_names(model)
    tensors = {"src": (["batch", "src_time"], "int64"), "src_len": (["batch"], "int64"),
               "memory": (["batch", "memory", c.memory_features], "float32"),
               "keys": (["batch", "memory", c.attn_dim], "float32"), "mask": (["batch", "memory"], "bool"),
               "state": ([c.layers, "batch", c.dec_hidden], "float32"), "prev": (["batch"], "int64"),
               "logits": (["batch", c.tgt_vocab], "float32"),
               "state_out": ([c.layers, "batch", c.dec_hidden], "float32")}

    def t(name: str, shape: list | None = None, dtype: str = "float32") -> dict:
        shape, dtype = (shape, dtype) if shape is not None else tensors[name]
        return {"name": name, "shape": shape, "dtype": dtype}

    return {ENCODER: {"inputs": [t(n) for n in ENCODER_INPUTS], "outputs": [t(n) for n in encoder_outputs]},
            DECODER: {"inputs": [t(n) for n in decoder_inputs], "outputs": [t(n) for n in DECODER_OUTPUTS]},
            TOPK: {"inputs": [t("logits", ["batch", c.tgt_vocab]), t("k", [1], "int64")],
                   "outputs": [t("log_probs", ["batch", "k"]), t("ids", ["batch", "k"], "int64")]}}


def export_seq2seq(model: Seq2Seq, src_tokenizer, tgt_tokenizer, out_dir: str | Path, *,
                   sentences: list[str] | None = None, train_config: dict | None = None,
                   evaluation: dict | None = None, name: str | None = None,
                   tolerance: float = PARITY_TOLERANCE) -> Path:
    """Exports ``model`` with its tokenizers as a bundle at ``out_dir`` (replacing a bundle there).

    ``sentences``: source texts for the search check (default: a few fixed English sentences).
    Raises ExportError when a graph differs from torch by more than ``tolerance`` or a search output
    differs; then nothing is written at ``out_dir``.
    """
    model = model.eval()
    out_dir = Path(out_dir)
    train_config = train_config or {}
    with staging_dir(out_dir) as tmp:
        export_graphs(model, tmp / ENCODER_FILE, tmp / DECODER_FILE)
        parity = check_parity(model, tmp / ENCODER_FILE, tmp / DECODER_FILE)
        if not parity.worst <= tolerance:
            raise ExportError(
                f"onnxruntime and torch disagree: max abs difference {parity.max_abs_logits:.3g} on logits, "
                f"{parity.max_abs_state:.3g} on the decoder state, {parity.max_abs_encoder:.3g} on the "
                f"encoder outputs (worst: {parity.worst_case}; tolerance {tolerance:g}); bundle not written")
        build_topk_graph(tmp / TOPK_FILE, model.config.tgt_vocab)
        save_tokenizer(src_tokenizer, tmp / SRC_TOKENIZER_FILE)
        save_tokenizer(tgt_tokenizer, tmp / TGT_TOKENIZER_FILE)
        manifest = {
            "kind": "seq2seq", "name": name or out_dir.name, "architecture": _architecture(model),
            "graphs": {ENCODER: ENCODER_FILE, DECODER: DECODER_FILE, TOPK: TOPK_FILE},
            "signatures": _signatures(model),
            "state": [{"name": "state", "output": "state_out",
                       "shape": [model.config.layers, "batch", model.config.dec_hidden], "dtype": "float32"}],
            "special_ids": tgt_tokenizer.special_ids, "source_special_ids": src_tokenizer.special_ids,
            "tokenizer": {"source": SRC_TOKENIZER_FILE, "target": TGT_TOKENIZER_FILE},
            "languages": {"source": train_config.get("src", "en"), "target": train_config.get("tgt", "fr")},
            "preprocessing": {"normalize": "NFC, no-break spaces to spaces, whitespace collapsed, stripped",
                              "lowercase": bool(train_config.get("lowercase", False)),
                              "max_src_tokens": 2 * int(train_config.get("max_len", 64))},
            "evaluation": evaluation, "training_config": train_config or None,
            "parity": {"tolerance": tolerance, **parity.to_dict()},
            "created_by": {"tool": "rnnlab seq2seq.export", "exporter": "torch.onnx (dynamo=False)",
                           "opset": OPSET, "torch": torch.__version__, "onnx": onnx.__version__},
        }
        write_manifest(tmp, manifest)
        runtime = Seq2SeqRuntime.load(tmp)
        manifest["search_check"] = check_search(model, runtime, list(sentences or DEFAULT_SENTENCES))
        write_manifest(tmp, manifest)
        return publish_bundle(tmp, out_dir)


def sample_sentences(train_config: dict, count: int = SAMPLE_SENTENCES) -> list[str]:
    """The first ``count`` source sentences of the run's valid split (empty if the data is unreadable)."""
    from lm.datasets import DatasetError
    from seq2seq.data import group_references, load_splits
    from seq2seq.train import TrainConfig

    config = TrainConfig.from_dict(train_config)
    try:
        groups = group_references(load_splits(config.data_config())["valid"], config.src, config.tgt)
    except (DatasetError, OSError):
        return []
    return [g.source for g in groups[:count]]


def export_run(run_dir: str | Path, out_dir: str | Path, *, sentences: list[str] | None = None,
               sample: int = SAMPLE_SENTENCES, which: str = "best", name: str | None = None) -> Path:
    """Exports a run's checkpoint; the search check uses ``sentences`` or ``sample`` valid sentences."""
    from seq2seq.run import load_run

    run = load_run(run_dir, which)
    if sentences is None:
        sentences = sample_sentences(run.train_config, sample) or None
    return export_seq2seq(run.model, run.src_tokenizer, run.tgt_tokenizer, out_dir, sentences=sentences,
                          train_config=run.train_config, evaluation=run.evaluation, name=name)


def describe(bundle_dir: str | Path) -> str:
    """One line about an exported bundle (for the CLI)."""
    data = json.loads((Path(bundle_dir) / "manifest.json").read_text(encoding="utf-8"))
    parity, check = data["parity"], data.get("search_check", {})
    return (f"{bundle_dir}: {data['name']} ({data['languages']['source']}->{data['languages']['target']}), "
            f"max |ORT - torch| logits {parity['max_abs_logits']:.2g}, greedy and beam-{check.get('beam')} "
            f"identical on {check.get('sentences')} sentences")
