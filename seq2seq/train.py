"""Training the translator on the shared loop (lm.loop): data, sentencepiece, teacher forcing, validation.

``Translation`` is the translator's lm.loop.Family. An epoch's batches are a pure function of (seed,
epoch) (seq2seq.batching), so with the loop's checkpoint (weights, optimiser, schedule, RNG state,
position) a run interrupted anywhere (Ctrl-C, SIGTERM, a budget) and resumed trains on exactly the same
batches with the same dropout masks as an uninterrupted one. best.pt holds the highest valid BLEU
(greedy, on the first ``valid_bleu_sentences`` valid sources); early stopping watches it too.

In a distributed run (lm.distributed) every global batch (the one a single process trains on) is split
by rank: rank r takes the r-th contiguous slice of its length-sorted sentences and divides its loss by
the tokens of the whole batch, so the all-reduced gradient is the single process's; a run resumes with
any number of processes.

The config's sections: data (seq2seq.data.DataConfig plus sentencepiece and batching), model
(seq2seq.model.Seq2SeqConfig without the vocabulary sizes), optim and run (lm.config, with the
translator's recipe as defaults).

Run directory: config.json, src_tokenizer.json, tgt_tokenizer.json, last.pt, best.pt, metrics.jsonl,
metrics.png (tensorboard/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lm import distributed, loop
from lm.loop import StepLoss, Trainer, TrainError
from lm.metrics import NATS_PER_TOKEN
from lm.progress import perplexity
from seq2seq.batching import make_batches
from seq2seq.config import MTDataConfig, TrainConfig
from seq2seq.data import Pair, group_references, load_splits
from seq2seq.decode import BOS, EOS, pad_batch, search
from seq2seq.loss import masked_cross_entropy, token_nll
from seq2seq.model import Seq2Seq
from serving.bleu import corpus_scores
from serving.search import SearchParams
from serving.tokenizers import SentencePieceTokenizer, tokenizer_from_dict

__all__ = ["CHECKPOINT_KIND", "TrainConfig", "TrainError", "Translation", "resume_run", "start_run", "train"]

CHECKPOINT_KIND = "mt"
SRC_TOKENIZER, TGT_TOKENIZER = "src_tokenizer.json", "tgt_tokenizer.json"
GREEDY = SearchParams(beam=1)
"""Validation BLEU is greedy: cheap, and it ranks checkpoints as beam search does."""


@dataclass
class Corpus:
    """Tokenised training pairs and the valid set, ready for batching."""

    src: list[list[int]]
    """Source ids + EOS."""
    tgt: list[list[int]]
    """BOS + target ids + EOS."""
    valid_src: list[list[int]]
    valid_tgt: list[list[int]]
    valid_bleu_src: list[list[int]]
    valid_bleu_refs: list[list[str]]

    @staticmethod
    def padded_lengths(src: list[list[int]], tgt: list[list[int]]) -> np.ndarray:
        return np.array([max(len(s), len(t) - 1) for s, t in zip(src, tgt, strict=True)])


def train_tokenizers(
    data: MTDataConfig, train: list[Pair]
) -> tuple[SentencePieceTokenizer, SentencePieceTokenizer]:
    """Sentencepiece on the training split only (unique sentences, in file order)."""
    src_text = list(dict.fromkeys(p.side(data.src) for p in train))
    tgt_text = list(dict.fromkeys(p.side(data.tgt) for p in train))
    if data.joint_spm:
        joint = SentencePieceTokenizer.train(src_text + tgt_text, data.spm_vocab, data.spm_type)
        return joint, joint
    return (
        SentencePieceTokenizer.train(src_text, data.spm_vocab, data.spm_type),
        SentencePieceTokenizer.train(tgt_text, data.spm_vocab, data.spm_type),
    )


def build_corpus(
    data: MTDataConfig,
    splits: dict[str, list[Pair]],
    src_tok: SentencePieceTokenizer,
    tgt_tok: SentencePieceTokenizer,
) -> Corpus:
    src_eos = src_tok.special_ids[EOS]
    bos, eos = tgt_tok.special_ids[BOS], tgt_tok.special_ids[EOS]

    def encode(pairs: list[Pair]) -> tuple[list[list[int]], list[list[int]]]:
        srcs, tgts = [], []
        for pair in pairs:
            s, t = src_tok.encode(pair.side(data.src)), tgt_tok.encode(pair.side(data.tgt))
            if len(s) <= data.max_len and len(t) <= data.max_len:
                srcs.append([*s, src_eos])
                tgts.append([bos, *t, eos])
        return srcs, tgts

    src, tgt = encode(splits["train"])
    valid_src, valid_tgt = encode(splits["valid"])
    if not src or not valid_src:
        raise TrainError(f"{data.dataset}: no training or no validation pairs after filtering")
    groups = group_references(splits["valid"], data.src, data.tgt)[: data.valid_bleu_sentences]
    return Corpus(
        src,
        tgt,
        valid_src,
        valid_tgt,
        [[*src_tok.encode(g.source), src_eos] for g in groups],
        [g.references for g in groups],
    )


def _batch_tensors(
    corpus_src: list[list[int]], corpus_tgt: list[list[int]], indices: np.ndarray, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> src (B,S), src_len (B,), tgt_in (B,T) (BOS ...), tgt_out (B,T) (... EOS), pad-filled."""
    src, src_len = pad_batch([corpus_src[i] for i in indices], pad)
    tgt, _ = pad_batch([corpus_tgt[i] for i in indices], pad)
    return src, src_len, tgt[:, :-1], tgt[:, 1:]


@torch.no_grad()
def validate(
    model: Seq2Seq, corpus: Corpus, tgt_tok: SentencePieceTokenizer, config: MTDataConfig
) -> dict[str, float]:
    """Valid NLL per token (no smoothing) over the valid split, and greedy BLEU on its first groups."""
    model.eval()
    total, tokens = 0.0, 0
    lengths = Corpus.padded_lengths(corpus.valid_src, corpus.valid_tgt)
    for indices in make_batches(lengths, 0, 0, config.batch_tokens):
        src, src_len, tgt_in, tgt_out = _batch_tensors(
            corpus.valid_src, corpus.valid_tgt, indices, model.config.pad_id
        )
        nll, count = token_nll(model(src, src_len, tgt_in), tgt_out, model.config.pad_id)
        total, tokens = total + nll, tokens + count
    hyps = search(model, corpus.valid_bleu_src, GREEDY, tgt_tok.special_ids[BOS], tgt_tok.special_ids[EOS])
    texts = [tgt_tok.decode(list(h[0].tokens)) for h in hyps]
    model.train()
    loss = total / max(tokens, 1)
    bleu = corpus_scores(texts, corpus.valid_bleu_refs)["bleu"]
    return {"loss": loss, "ppl": perplexity(loss), "bleu": bleu}


class Translation:
    """The translator's lm.loop.Family: teacher forcing, label-smoothed loss, token-budget batches."""

    kind = CHECKPOINT_KIND
    monitor, maximize = "bleu", True
    figures = NATS_PER_TOKEN  # the loss is the label-smoothed one; the logged figure the NLL per token

    def __init__(
        self,
        config: TrainConfig,
        src_tok: SentencePieceTokenizer,
        tgt_tok: SentencePieceTokenizer,
        splits: dict[str, list[Pair]],
    ) -> None:
        self.config, self.src_tok, self.tgt_tok = config, src_tok, tgt_tok
        self.corpus = build_corpus(config.data, splits, src_tok, tgt_tok)
        self.lengths = Corpus.padded_lengths(self.corpus.src, self.corpus.tgt)
        self.model_config = config.model_config(src_tok.vocab_size, tgt_tok.vocab_size)
        self.title = f"{config.data.src}→{config.data.tgt} {config.model.attention}"
        self._epoch: tuple[int, list[np.ndarray]] | None = None
        self.model: Seq2Seq | None = None
        self.group = distributed.current()
        self.target_tokens = np.array([len(t) - 1 for t in self.corpus.tgt])  # tgt_out of each pair

    def build_model(self) -> Seq2Seq:
        self.model = Seq2Seq(self.model_config)
        return self.model

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            data = self.config.data
            self._epoch = (
                epoch,
                make_batches(
                    self.lengths, self.config.optim.seed, epoch, data.batch_tokens, data.batch_sentences
                ),
            )
        return self._epoch[1]

    def epoch_length(self, epoch: int) -> int:
        return len(self._epoch_batches(epoch))

    def start_epoch(self, epoch: int) -> None:
        pass

    def batches(self, epoch: int, start: int) -> list[np.ndarray]:
        return self._epoch_batches(epoch)[start:]

    def step_loss(self, batch: np.ndarray) -> StepLoss:
        """batch: (B,) int64 pair indices of the global batch -> this rank's share of the smoothed loss
        and of the plain NLL that is logged (the sums over its pairs / the global batch's tokens)."""
        assert self.model is not None
        pad = self.model_config.pad_id
        mine, weight = self.group.share(batch), 1.0
        if len(mine) == 0:  # fewer pairs than ranks: DDP needs this rank's backward too, with no weight
            mine, weight = batch[:1], 0.0
        src, src_len, tgt_in, tgt_out = _batch_tensors(self.corpus.src, self.corpus.tgt, mine, pad)
        logits = self.model(src, src_len, tgt_in)
        per = int(self.target_tokens[batch].sum())
        loss, tokens = masked_cross_entropy(logits, tgt_out, pad, self.config.optim.label_smoothing, per)
        with torch.no_grad():  # comparable with the valid loss (the smoothed loss is higher)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=pad, reduction="sum"
            ) / max(per, 1)
        if weight == 0.0:
            return StepLoss(loss * 0.0, nll * 0.0, 0)
        return StepLoss(loss, nll, tokens)

    def validate(self) -> dict[str, float]:
        assert self.model is not None
        return validate(self.model, self.corpus, self.tgt_tok, self.config.data)

    def payload(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "src_tokenizer": self.src_tok.to_dict(),
            "tgt_tokenizer": self.tgt_tok.to_dict(),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        pass  # nothing is carried from one batch to the next

    def run_files(self) -> dict[str, Any]:
        return {
            "config.json": {
                "train": self.config.to_dict(),
                "model": self.model_config.to_dict(),
                "special_ids": self.tgt_tok.special_ids,
            },
            SRC_TOKENIZER: self.src_tok.to_dict(),
            TGT_TOKENIZER: self.tgt_tok.to_dict(),
        }


def start_run(config: TrainConfig, out: str | Path, **trainer_options: Any) -> Trainer:
    """A trainer for a new run in ``out``; data and tokenizers are ready before the directory is made."""
    loop.check_new_run_dir(Path(out))
    splits = load_splits(config.data)
    src_tok, tgt_tok = distributed.current().tokenizers(
        lambda: list(train_tokenizers(config.data, splits["train"]))
    )
    return loop.start_run(Translation(config, src_tok, tgt_tok, splits), config, out, **trainer_options)


def _family_for(config: TrainConfig, payload: dict[str, Any]) -> Translation:
    src_tok = tokenizer_from_dict(payload["src_tokenizer"])
    tgt_tok = tokenizer_from_dict(payload["tgt_tokenizer"])
    return Translation(config, src_tok, tgt_tok, load_splits(config.data))  # type: ignore[arg-type]


def resume_run(out: str | Path, overrides: dict[str, Any], **trainer_options: Any) -> Trainer:
    """Continues the run in ``out`` exactly where it stopped; only [run] settings may change."""
    return loop.resume_run(_family_for, TrainConfig, CHECKPOINT_KIND, out, overrides, **trainer_options)


def train(
    config: TrainConfig, out_dir: str | Path, resume: bool = False, show_progress: bool | None = None
) -> dict[str, Any]:
    """Trains a new run (or resumes one: then ``config``'s [run] settings apply); returns its summary."""
    if show_progress is not None:
        config = TrainConfig.from_dict({**config.to_dict(), "progress": show_progress})
    if resume:
        trainer = resume_run(out_dir, {k: v for k, v in config.to_sections()["run"].items()})
    else:
        trainer = start_run(config, out_dir)
    return trainer.summary(trainer.fit().reason)
