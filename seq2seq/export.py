"""Export a trained translator to an ONNX bundle that ``serving.translator`` runs without torch.

Two graphs, both from the legacy (TorchScript) exporter (``lm.exporter.export_graph``: the dynamo
exporter freezes a bidirectional GRU's time axis to the example's length, and the legacy one turns the
encoder's packed sequences into the ONNX GRU's ``sequence_lens``)::

    encoder.onnx       src (B,S) int64, src_len (B,) int64 -> projected_memory (B,M,G), keys (B,M,A),
                                                               mask (B,M) bool, state (L,B,H)
    decoder_step.onnx  prev (N,) int64, k (1,) int64, state (L,N,H), projected_memory, keys, mask (n rows)
                           -> log_probs (N,k), ids (N,k) int64 (best first), state_out (L,N,H)

They compute the model's ``encode`` and ``decode_step`` rearranged for inference (see
``context_weight``, ``token_table`` and ``DecoderStepGraph``): keys and the decoder's context products
are computed once per memory slot in the encoder, the previous token's input products are a table
row, and the step ends with each row's k best tokens, so the search never handles (rows, vocabulary)
arrays. The memory has one row per sentence; the N decoder rows are N / n consecutive rows per
sentence (a beam's K rows). Without attention the memory is one slot, and there are no keys and no
mask inputs.

Before anything is published: (1) both graphs are run in onnxruntime against torch at several batch
sizes and source lengths (every token's log-probability, states and encoder outputs within
``PARITY_TOLERANCE``), and (2) the onnxruntime translator and the torch decoder translate sample
sentences greedily and with a beam, and must produce identical tokens. Otherwise ExportError says by
how much, and nothing is written. Staging, the parity report, the manifest and the atomic publication
are the shared exporter skeleton's (lm/exporter.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lm.exporter import (
    PARITY_TOLERANCE,
    BundleWriter,
    ExportError,
    ParityMeter,
    ParityReport,
    created_by,
    export_graph,
    max_abs_diff,
    require_parity,
)
from seq2seq.decode import search as torch_search
from seq2seq.model import Seq2Seq
from serving.bundle import TensorSpec, load_manifest
from serving.runtime import open_session
from serving.search import SearchParams
from serving.tokenizers import SentencePieceTokenizer, save_tokenizer
from serving.translator import (
    DECODER,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    PLAIN_DECODER_INPUTS,
    PLAIN_ENCODER_OUTPUTS,
    Seq2SeqRuntime,
)

KIND = "seq2seq"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder_step.onnx"
SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE = "src_tokenizer.json", "tgt_tokenizer.json"
JOINT_TOKENIZER_FILE = "tokenizer.json"
# (batch, source length) of the graph parity cases; lengths inside a batch vary down to 1.
PARITY_SHAPES = ((1, 1), (1, 9), (3, 5), (4, 17), (8, 30))
PARITY_STEPS = 4
SEARCH_BEAM = 4
SAMPLE_SENTENCES = 64
DEFAULT_SENTENCES = ("Hello.", "I am cold.", "Where is the station?", "We will see you tomorrow.",
                     "She does not like tea.", "Tom is reading a book in the garden.", "Go!",
                     "Can you help me, please?")


def context_weight(model: Seq2Seq) -> Tensor:
    """(G, C), G = 3H + R: the decoder's weights on its context (C features): the first GRU layer's
    input gates, then the read-out. Both are linear in the context, and the context is an attention-
    weighted sum of memory slots, so the graphs apply them to every memory slot once per sentence
    (encoder) instead of to the context at every step."""
    c, decoder = model.config, model.decoder
    readout = model.readout.weight[:, c.dec_hidden:c.dec_hidden + c.memory_features]
    return torch.cat([decoder.weight_ih_l0[:, c.embed:], readout], dim=0).detach().clone()


def token_table(model: Seq2Seq) -> Tensor:
    """(V, G): per previous token, its embedding times the first GRU layer's input weights plus that
    layer's input bias, and times the read-out's weights plus its bias (a gather instead of two
    matrix products per step)."""
    c, decoder = model.config, model.decoder
    embedding = model.tgt_embed.weight
    gates = embedding @ decoder.weight_ih_l0[:, :c.embed].t() + decoder.bias_ih_l0
    readout = embedding @ model.readout.weight[:, c.dec_hidden + c.memory_features:].t() + model.readout.bias
    return torch.cat([gates, readout], dim=1).detach().clone()


class EncoderGraph(nn.Module):
    """``Seq2Seq.encode`` with the memory projected by ``context_weight``."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("context_weight", context_weight(model))

    def forward(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, ...]:
        """src (B,S), src_len (B,) -> projected_memory (B,M,G) [, keys (B,M,A), mask (B,M)], state (L,B,H)."""
        enc_out, mask, state = self.model.encode(src, src_len)
        memory, keys = self.model._split(enc_out)
        projected = memory @ self.context_weight.t()
        return (projected, state) if keys is None else (projected, keys, mask, state)


def _gru_cell(gates_in: Tensor, gates_h: Tensor, h: Tensor) -> Tensor:
    """torch.nn.GRU's cell: gates_in (N,3H) = W_ih x + b_ih, gates_h (N,3H) = W_hh h + b_hh, h (N,H)
    -> h' (N,H)."""
    in_r, in_z, in_n = gates_in.chunk(3, dim=1)
    h_r, h_z, h_n = gates_h.chunk(3, dim=1)
    reset, update = torch.sigmoid(in_r + h_r), torch.sigmoid(in_z + h_z)
    return (1 - update) * torch.tanh(in_n + reset * h_n) + update * h


class DecoderStepGraph(nn.Module):
    """``Seq2Seq.decode_step`` (eval mode) then each row's k best tokens, over ``EncoderGraph``'s outputs.

    The same function as the model's step, computed with fewer multiplications: the token's share of
    the first GRU layer's input gates and of the read-out is a row of ``token_table``; the context's
    share is the attention-weighted sum of the projected memory slots; the top layer's recurrent gates
    and the attention query are one product (both read the previous top state). The memory has a row
    per sentence and the N decoder rows are R consecutive rows per sentence (a beam's rows read their
    sentence's memory in one batched product). No (N,V) array leaves the graph.
    """

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model
        c, gru = model.config, model.decoder
        top = c.layers - 1
        self.register_buffer("token_table", token_table(model))
        self.register_buffer("readout_state", model.readout.weight[:, :c.dec_hidden].detach().clone())
        query_weight, query_bias = [], []
        if model.attention is not None:
            query_weight, query_bias = [model.attention.query.weight], [model.attention.query.bias]
        top_weight = torch.cat([getattr(gru, f"weight_hh_l{top}"), *query_weight])
        self.register_buffer("top_weight", top_weight.detach().clone())
        top_bias = torch.cat([getattr(gru, f"bias_hh_l{top}"), *query_bias])
        self.register_buffer("top_bias", top_bias.detach().clone())

    def forward(self, prev: Tensor, k: Tensor, state: Tensor, projected: Tensor, keys: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """prev (N,) int64, k (1,) int64, state (L,N,H), projected (n,M,G) [, keys (n,M,A), mask (n,M)]
        with N = n * R -> log_probs (N,k) f32, ids (N,k) int64 (best first), state_out (L,N,H)."""
        model, c = self.model, self.model.config
        gates, sentences = 3 * c.dec_hidden, projected.shape[0]
        top = F.linear(state[-1], self.top_weight, self.top_bias)  # (N, 3H [+ A])
        if keys is None or mask is None or model.attention is None:
            context = projected  # (n,1,G): the one memory slot, for all R rows
        else:
            query = top[:, gates:].reshape(sentences, -1, 1, c.attn_dim)  # (n,R,1,A)
            scores = model.attention.score(torch.tanh(keys.unsqueeze(1) + query)).squeeze(3)  # (n,R,M)
            weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=2)
            context = torch.bmm(weights, projected)  # (n,R,G)
        mixed = (self.token_table[prev].reshape(sentences, -1, context.shape[2]) + context).reshape(
            prev.shape[0], -1)
        gates_in, readout_in = mixed[:, :gates], mixed[:, gates:]
        states, gru = [], model.decoder
        for layer in range(c.layers):
            if layer:
                gates_in = F.linear(states[-1], getattr(gru, f"weight_ih_l{layer}"),
                                    getattr(gru, f"bias_ih_l{layer}"))
            gates_h = top[:, :gates] if layer == c.layers - 1 else F.linear(
                state[layer], getattr(gru, f"weight_hh_l{layer}"), getattr(gru, f"bias_hh_l{layer}"))
            states.append(_gru_cell(gates_in, gates_h, state[layer]))
        logits = model.out(torch.tanh(readout_in + states[-1] @ self.readout_state.t()))
        ids = logits.topk(k, dim=1).indices  # type: ignore[call-overload]  # k: a graph input
        return torch.log_softmax(logits, dim=1).gather(1, ids), ids, torch.stack(states)


def graph_names(model: Seq2Seq) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(encoder outputs, decoder inputs): without attention no keys, and no decoder mask."""
    if model.config.attention == "none":
        return PLAIN_ENCODER_OUTPUTS, PLAIN_DECODER_INPUTS
    return ENCODER_OUTPUTS, DECODER_INPUTS


def export_graphs(model: Seq2Seq, encoder_path: Path, decoder_path: Path) -> None:
    """Writes both graphs of an eval-mode model, with dynamic batch, source length, memory and k axes
    (the symbolic dimensions of ``signatures``)."""
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]], dtype=torch.int64).clamp_(max=model.config.src_vocab - 1)
    src_len = torch.tensor([4, 2], dtype=torch.int64)
    encoder, decoder = signatures(model)
    export_graph(EncoderGraph(model), (src, src_len), encoder_path, encoder.inputs, encoder.outputs)
    with torch.no_grad():
        outputs = dict(zip([t.name for t in encoder.outputs], EncoderGraph(model)(src, src_len), strict=True))
    outputs["prev"] = torch.tensor([2, 2], dtype=torch.int64)
    outputs["k"] = torch.tensor([2], dtype=torch.int64)
    export_graph(DecoderStepGraph(model), tuple(outputs[t.name] for t in decoder.inputs), decoder_path,
                 decoder.inputs, decoder.outputs)


def check_parity(model: Seq2Seq, encoder_path: Path, decoder_path: Path,
                 shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES, seed: int = 0) -> ParityReport:
    """Random sources of each (batch, length) with varied lengths, then PARITY_STEPS decoder steps fed
    the torch encoder's outputs and random previous tokens; max abs differences per tensor kind. The
    decoder graph is asked for all V tokens, so every log-probability is compared with torch's."""
    encoder, decoder = open_session(encoder_path), open_session(decoder_path)
    encoder_outputs, decoder_inputs = graph_names(model)
    config = model.config
    weight = context_weight(model)
    gen = torch.Generator().manual_seed(seed)
    meter = ParityMeter(encoder="the encoder outputs", log_probs="log-probabilities",
                        state="the decoder state")
    for batch, length in shapes:
        src_len = torch.randint(1, length + 1, (batch,), generator=gen)
        src_len[0] = max(1, length - 1) if batch > 2 else length  # also a batch padded beyond its longest
        src = torch.randint(min(4, config.src_vocab - 1), config.src_vocab, (batch, length), generator=gen)
        src = src.masked_fill(torch.arange(length)[None, :] >= src_len[:, None], config.pad_id)
        with torch.no_grad():
            enc_out, mask, state = model.encode(src, src_len)
            memory, keys = model._split(enc_out)
            want = {"projected_memory": memory @ weight.t(), "keys": keys, "mask": mask, "state": state,
                    "k": torch.tensor([config.tgt_vocab])}
        got = dict(zip(encoder_outputs, encoder.run(None, {"src": src.numpy(), "src_len": src_len.numpy()}),
                       strict=True))
        diffs = {"encoder": max(0.0 if np.array_equal(got[name], want[name].numpy()) else np.inf
                                if name == "mask" else max_abs_diff(got[name], want[name]) for name in got)}
        diffs["log_probs"] = diffs["state"] = 0.0
        for _ in range(PARITY_STEPS):
            prev = torch.randint(0, config.tgt_vocab, (batch,), generator=gen)
            with torch.no_grad():
                logits, new_state = model.decode_step(prev, state, enc_out, mask)
            feed = {**want, "prev": prev, "state": state}
            log_probs, ids, out_state = decoder.run(None, {n: feed[n].numpy() for n in decoder_inputs})
            want_log_probs = torch.log_softmax(logits, dim=1).gather(1, torch.from_numpy(ids))
            diffs["log_probs"] = max(diffs["log_probs"], max_abs_diff(log_probs, want_log_probs))
            diffs["state"] = max(diffs["state"], max_abs_diff(out_state, new_state))
            state = new_state
        meter.case(f"B={batch} S={length}", **diffs)
    return meter.report()


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
        ours = runtime.search(sources, SearchParams(beam=k, n_best=k))
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


class GraphSignature(NamedTuple):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def signatures(model: Seq2Seq) -> tuple[GraphSignature, GraphSignature]:
    """(encoder, decoder step) inputs and outputs; symbolic axes are the graphs' dynamic axes. The
    decoder reads the memory per sentence ("sentences" rows), not per decoder row ("batch" rows): an
    axis of its own, or onnxruntime would take the two for equal and simplify the per-sentence reshapes
    away."""
    c = model.config
    encoder_outputs, decoder_inputs = graph_names(model)
    tensors = {"src": (["batch", "src_time"], "int64"), "src_len": (["batch"], "int64"),
               "projected_memory": (["batch", "memory", 3 * c.dec_hidden + c.embed], "float32"),
               "keys": (["batch", "memory", c.attn_dim], "float32"), "mask": (["batch", "memory"], "bool"),
               "state": ([c.layers, "batch", c.dec_hidden], "float32"), "prev": (["batch"], "int64"),
               "k": ([1], "int64"), "log_probs": (["batch", "k"], "float32"),
               "ids": (["batch", "k"], "int64"),
               "state_out": ([c.layers, "batch", c.dec_hidden], "float32")}

    def t(name: str, rows: str = "batch") -> TensorSpec:
        shape, dtype = tensors[name]
        return TensorSpec(name, tuple(rows if d == "batch" else d for d in shape), dtype)

    memory_names = ("projected_memory", "keys", "mask")
    return (GraphSignature(tuple(t(n) for n in ENCODER_INPUTS), tuple(t(n) for n in encoder_outputs)),
            GraphSignature(tuple(t(n, "sentences" if n in memory_names else "batch") for n in decoder_inputs),
                           tuple(t(n) for n in DECODER_OUTPUTS)))


def _save_tokenizers(bundle: BundleWriter, src: SentencePieceTokenizer, tgt: SentencePieceTokenizer,
                     ) -> dict[str, str]:
    """Writes the tokenizers -> the manifest's ``tokenizer`` {"source": file, "target": file}. A joint
    sentencepiece model (``joint_spm``) is written once, as JOINT_TOKENIZER_FILE, for both roles."""
    if src.model_proto == tgt.model_proto:
        save_tokenizer(src, bundle.path(JOINT_TOKENIZER_FILE))
        return {"source": JOINT_TOKENIZER_FILE, "target": JOINT_TOKENIZER_FILE}
    save_tokenizer(src, bundle.path(SRC_TOKENIZER_FILE))
    save_tokenizer(tgt, bundle.path(TGT_TOKENIZER_FILE))
    return {"source": SRC_TOKENIZER_FILE, "target": TGT_TOKENIZER_FILE}


def export_seq2seq(model: Seq2Seq, src_tokenizer: SentencePieceTokenizer,
                   tgt_tokenizer: SentencePieceTokenizer, out_dir: str | Path, *,
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
    with BundleWriter(out_dir) as bundle:
        encoder, decoder = bundle.path(ENCODER_FILE), bundle.path(DECODER_FILE)
        export_graphs(model, encoder, decoder)
        parity = require_parity(check_parity(model, encoder, decoder), "the translator's graphs", tolerance)
        tokenizers = _save_tokenizers(bundle, src_tokenizer, tgt_tokenizer)
        encoder_signature, decoder_signature = signatures(model)
        manifest = {
            "kind": KIND, "name": name or out_dir.name, "architecture": _architecture(model),
            "graphs": {ENCODER: ENCODER_FILE, DECODER: DECODER_FILE},
            "signatures": {ENCODER: encoder_signature.to_dict(), DECODER: decoder_signature.to_dict()},
            "state": [{"name": "state", "output": "state_out",
                       "shape": [model.config.layers, "batch", model.config.dec_hidden], "dtype": "float32"}],
            "special_ids": tgt_tokenizer.special_ids, "source_special_ids": src_tokenizer.special_ids,
            "tokenizer": tokenizers,
            "languages": {"source": train_config.get("src", "en"), "target": train_config.get("tgt", "fr")},
            "preprocessing": {"normalize": "NFC, no-break spaces to spaces, whitespace collapsed, stripped",
                              "lowercase": bool(train_config.get("lowercase", False)),
                              "max_src_tokens": 2 * int(train_config.get("max_len", 64))},
            "evaluation": evaluation, "training_config": train_config or None, "parity": parity,
            "created_by": created_by("rnnlab seq2seq.export"),
        }
        bundle.write_manifest(manifest)  # the search check runs the staged bundle as the server would
        runtime = Seq2SeqRuntime.load(bundle.dir)
        manifest["search_check"] = check_search(model, runtime, list(sentences or DEFAULT_SENTENCES))
        return bundle.publish(manifest)


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
    data = load_manifest(bundle_dir, verify=False).data
    parity, check = data["parity"], data.get("search_check", {})
    return (f"{bundle_dir}: {data['name']} ({data['languages']['source']}->{data['languages']['target']}), "
            f"max |ORT - torch| log-probabilities {parity['max_abs_log_probs']:.2g}, "
            f"greedy and beam-{check.get('beam')} "
            f"identical on {check.get('sentences')} sentences")
