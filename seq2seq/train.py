"""Training the translator: data, sentencepiece, teacher forcing, validation, checkpoints, exact resume.

The machinery (checkpoints, RNG capture, metrics file and plot, progress bar, learning-rate schedule,
early stopping, time budget) is the language model's, from ``lm``. An epoch's batches are a pure
function of (seed, epoch) and the global RNG state is saved with every checkpoint, so a run that is
interrupted and resumed (``resume=True``) trains on exactly the same batches with the same dropout
masks as an uninterrupted one.

Run directory: config.json, src_tokenizer.json, tgt_tokenizer.json, last.pt, best.pt (highest valid
BLEU), metrics.jsonl, metrics.png.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.config import project
from lm.metrics import MetricsLog, plot_metrics, read_metrics
from lm.progress import Progress, perplexity
from lm.rng import capture_rng_state, restore_rng_state, seed_everything
from lm.schedule import EarlyStopping, TimeBudget, make_lr_scheduler
from seq2seq.batching import make_batches
from seq2seq.data import DataConfig, Pair, group_references, load_splits
from seq2seq.decode import BOS, EOS, pad_batch, search
from seq2seq.loss import masked_cross_entropy, token_nll
from seq2seq.model import Seq2Seq, Seq2SeqConfig
from serving.bleu import corpus_scores
from serving.errors import UserError
from serving.files import atomic_write_bytes
from serving.search import SearchParams
from serving.tokenizers import SentencePieceTokenizer, save_tokenizer, tokenizer_from_dict

CHECKPOINT_KIND = "mt"
SCHEDULES = ("constant", "noam", "plateau")
"""The lm schedules that need no total step count (training length is set by time and early stopping)."""
SRC_TOKENIZER, TGT_TOKENIZER = "src_tokenizer.json", "tgt_tokenizer.json"


class TrainError(UserError):
    """A user-facing training failure (bad run directory, no data); one-line message."""


@dataclass
class TrainConfig:
    # data (see seq2seq.data.DataConfig)
    dataset: str = "fra-eng"
    src: str = "en"
    tgt: str = "fr"
    lowercase: bool = False
    max_words: int = 25
    valid_fraction: float = 0.02
    test_fraction: float = 0.03
    # sentencepiece, trained on the training split only
    spm_vocab: int = 4000
    """Per side; with joint_spm, the size of the one shared model."""
    spm_type: str = "unigram"
    joint_spm: bool = False
    max_len: int = 64
    """Training pairs with more tokens than this on either side are skipped."""
    # model (see seq2seq.model.Seq2SeqConfig)
    embed: int = 256
    enc_hidden: int = 256
    dec_hidden: int = 256
    layers: int = 1
    bidirectional: bool = True
    attention: str = "additive"
    attn_dim: int = 256
    dropout: float = 0.2
    tie: bool = True
    # optimisation
    batch_tokens: int = 4000
    """Budget per batch: sentences * longest padded length (source or target)."""
    batch_sentences: int = 0
    """> 0: also at most this many sentences per batch."""
    lr: float = 2e-3
    weight_decay: float = 0.01
    schedule: str = "noam"
    warmup_steps: int = 200
    clip: float = 1.0
    label_smoothing: float = 0.1
    # stopping, validation, checkpoints
    epochs: int = 40
    patience: int = 4
    """Stop after this many validations without a better valid BLEU."""
    max_minutes: float | None = 55.0
    max_steps: int = 0
    """> 0: stop after this many optimizer steps in total (an interruption point for tests)."""
    valid_bleu_sentences: int = 500
    checkpoint_every: int = 200
    seed: int = 1
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""

    def data_config(self) -> DataConfig:
        return project(DataConfig, self)

    def model_config(self, src_vocab: int, tgt_vocab: int) -> Seq2SeqConfig:
        return project(Seq2SeqConfig, self, src_vocab=src_vocab, tgt_vocab=tgt_vocab)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __post_init__(self) -> None:
        self.data_config()  # validates the data fields
        self.model_config(1, 1)
        if self.batch_tokens < 1 or self.batch_sentences < 0 or self.max_len < 1 or self.spm_vocab < 8:
            raise ValueError("batch_tokens, max_len must be positive, spm_vocab >= 8, batch_sentences >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.schedule == "noam" and self.warmup_steps < 1:
            raise ValueError("the noam schedule needs warmup_steps >= 1")
        if self.spm_type not in ("unigram", "bpe"):
            raise ValueError(f"spm_type must be unigram or bpe, not {self.spm_type!r}")
        if self.patience < 1 or self.epochs < 1:
            raise ValueError("patience and epochs must be at least 1")


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


def train_tokenizers(config: TrainConfig, train: list[Pair]
                     ) -> tuple[SentencePieceTokenizer, SentencePieceTokenizer]:
    """Sentencepiece on the training split only (unique sentences, in file order)."""
    src_text = list(dict.fromkeys(p.side(config.src) for p in train))
    tgt_text = list(dict.fromkeys(p.side(config.tgt) for p in train))
    if config.joint_spm:
        joint = SentencePieceTokenizer.train(src_text + tgt_text, config.spm_vocab, config.spm_type)
        return joint, joint
    return (SentencePieceTokenizer.train(src_text, config.spm_vocab, config.spm_type),
            SentencePieceTokenizer.train(tgt_text, config.spm_vocab, config.spm_type))


def build_corpus(config: TrainConfig, splits: dict[str, list[Pair]], src_tok: SentencePieceTokenizer,
                 tgt_tok: SentencePieceTokenizer) -> Corpus:
    src_eos = src_tok.special_ids[EOS]
    bos, eos = tgt_tok.special_ids[BOS], tgt_tok.special_ids[EOS]

    def encode(pairs: list[Pair]) -> tuple[list[list[int]], list[list[int]]]:
        srcs, tgts = [], []
        for pair in pairs:
            s, t = src_tok.encode(pair.side(config.src)), tgt_tok.encode(pair.side(config.tgt))
            if len(s) <= config.max_len and len(t) <= config.max_len:
                srcs.append([*s, src_eos])
                tgts.append([bos, *t, eos])
        return srcs, tgts

    src, tgt = encode(splits["train"])
    valid_src, valid_tgt = encode(splits["valid"])
    if not src or not valid_src:
        raise TrainError(f"{config.dataset}: no training or no validation pairs after filtering")
    groups = group_references(splits["valid"], config.src, config.tgt)[: config.valid_bleu_sentences]
    return Corpus(src, tgt, valid_src, valid_tgt,
                  [[*src_tok.encode(g.source), src_eos] for g in groups], [g.references for g in groups])


def _batch_tensors(corpus_src: list[list[int]], corpus_tgt: list[list[int]], indices: np.ndarray, pad: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> src (B,S), src_len (B,), tgt_in (B,T) (BOS ...), tgt_out (B,T) (... EOS), pad-filled."""
    src, src_len = pad_batch([corpus_src[i] for i in indices], pad)
    tgt, _ = pad_batch([corpus_tgt[i] for i in indices], pad)
    return src, src_len, tgt[:, :-1], tgt[:, 1:]


@torch.no_grad()
def validate(model: Seq2Seq, corpus: Corpus, tgt_tok: SentencePieceTokenizer, config: TrainConfig
             ) -> dict[str, float]:
    """Valid NLL per token (no smoothing) over the valid split, and greedy BLEU on its first groups."""
    model.eval()
    total, tokens = 0.0, 0
    lengths = Corpus.padded_lengths(corpus.valid_src, corpus.valid_tgt)
    for indices in make_batches(lengths, 0, 0, config.batch_tokens):
        src, src_len, tgt_in, tgt_out = _batch_tensors(corpus.valid_src, corpus.valid_tgt, indices,
                                                       model.config.pad_id)
        nll, count = token_nll(model(src, src_len, tgt_in), tgt_out, model.config.pad_id)
        total, tokens = total + nll, tokens + count
    hyps = search(model, corpus.valid_bleu_src, SearchParams(), tgt_tok.special_ids[BOS],
                  tgt_tok.special_ids[EOS])
    texts = [tgt_tok.decode(list(h[0].tokens)) for h in hyps]
    model.train()
    loss = total / max(tokens, 1)
    bleu = corpus_scores(texts, corpus.valid_bleu_refs)["bleu"]
    return {"loss": loss, "ppl": perplexity(loss), "bleu": bleu}


class Trainer:
    """One training run in ``out_dir``; ``run()`` trains until a stopping rule fires."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, resume: bool = False,
                 show_progress: bool | None = None) -> None:
        self.out = Path(out_dir)
        self.show_progress = show_progress
        payload = self._open_run_dir(resume)
        self.config = config if payload is None else self._resumed_config(payload["train_config"], config)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        seed_everything(self.config.seed)
        splits = load_splits(self.config.data_config())
        if payload is None:
            self.src_tok, self.tgt_tok = train_tokenizers(self.config, splits["train"])
        else:
            self.src_tok = tokenizer_from_dict(payload["src_tokenizer"])
            self.tgt_tok = tokenizer_from_dict(payload["tgt_tokenizer"])
        self.corpus = build_corpus(self.config, splits, self.src_tok, self.tgt_tok)
        self.model_config = self.config.model_config(self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        self.model = Seq2Seq(self.model_config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.schedule = make_lr_scheduler(self.optimizer, self.config.schedule, self.config.warmup_steps)
        self.early = EarlyStopping(self.config.patience)
        self.epoch, self.batch, self.step, self.best_bleu, spent = 0, 0, 0, -math.inf, 0.0
        if payload is None:
            self._write_run_files()
        else:
            self._restore(payload)
            spent = float(payload["elapsed_s"])
        self.budget = TimeBudget(self.config.max_minutes, already_spent_s=spent)

    # --- run directory ---------------------------------------------------------------------------------
    def _open_run_dir(self, resume: bool) -> dict | None:
        last = self.out / "last.pt"
        if resume:
            if not last.is_file():
                raise TrainError(f"{last}: no checkpoint to resume from")
            return load_checkpoint(last, CHECKPOINT_KIND)
        if last.exists() or (self.out / "config.json").exists():
            raise TrainError(f"{self.out}: already holds a run (use --resume, or another --out)")
        return None

    @staticmethod
    def _resumed_config(saved: dict, given: TrainConfig) -> TrainConfig:
        """The saved configuration; only the stopping rules may be changed on resume."""
        return TrainConfig.from_dict({**saved, "max_minutes": given.max_minutes, "max_steps": given.max_steps,
                                      "epochs": given.epochs, "threads": given.threads})

    def _write_run_files(self) -> None:
        """Creates the run directory once data and tokenizers are ready (a failure before leaves nothing)."""
        self.out.mkdir(parents=True, exist_ok=True)
        document = {"train": asdict(self.config), "model": self.model_config.to_dict(),
                    "special_ids": self.tgt_tok.special_ids}
        atomic_write_bytes(self.out / "config.json", json.dumps(document, indent=2).encode("utf-8"))
        save_tokenizer(self.src_tok, self.out / SRC_TOKENIZER)
        save_tokenizer(self.tgt_tok, self.out / TGT_TOKENIZER)

    def _payload(self) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "model_config": self.model_config.to_dict(),
                "train_config": asdict(self.config), "src_tokenizer": self.src_tok.to_dict(),
                "tgt_tokenizer": self.tgt_tok.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "early_stopping": self.early.state_dict(), "rng": capture_rng_state(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "best_bleu": self.best_bleu,
                "elapsed_s": self.budget.elapsed_s}

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["scheduler"])
        self.early.load_state_dict(payload["early_stopping"])
        restore_rng_state(payload["rng"])
        self.epoch, self.batch, self.step = int(payload["epoch"]), int(payload["batch"]), int(payload["step"])
        self.best_bleu = float(payload["best_bleu"])
        # Records written after the checkpoint belong to training that is about to be repeated.
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            kept = [r for r in read_metrics(metrics) if r.get("step", 0) <= self.step]
            atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def save(self, name: str) -> None:
        save_checkpoint(self.out / name, self._payload())

    # --- training --------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        return bool(self.config.max_steps and self.step >= self.config.max_steps) or self.budget.exceeded()

    def train_step(self, indices: np.ndarray) -> tuple[float, int]:
        """One optimizer step -> (NLL per target token, without label smoothing; target tokens)."""
        pad = self.model_config.pad_id
        src, src_len, tgt_in, tgt_out = _batch_tensors(self.corpus.src, self.corpus.tgt, indices, pad)
        logits = self.model(src, src_len, tgt_in)
        loss, tokens = masked_cross_entropy(logits, tgt_out, pad, self.config.label_smoothing)
        # Logged and shown: the plain NLL, comparable with the valid loss (the smoothed loss is higher).
        nll = token_nll(logits.detach(), tgt_out, pad)[0] / max(tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return nll, tokens

    def _validate(self, log: MetricsLog, progress: Progress, count: bool = True) -> bool:
        """Validates, logs, keeps best.pt; True when early stopping says stop.

        ``count=False`` (a validation at an interruption) leaves early stopping and the schedule alone,
        so an interrupted run's state stays that of an uninterrupted one.
        """
        result = validate(self.model, self.corpus, self.tgt_tok, self.config)
        log.write(split="valid", step=self.step, epoch=self.epoch, **result,
                  elapsed_s=round(self.budget.elapsed_s, 1))
        progress.write(f"step {self.step} epoch {self.epoch}: valid loss {result['loss']:.3f} "
                       f"ppl {result['ppl']:.2f} BLEU {result['bleu']:.2f}")
        if result["bleu"] > self.best_bleu:
            self.best_bleu = result["bleu"]
            self.save("best.pt")
        if not count:
            return False
        self.schedule.on_validation(result["loss"])
        return self.early.update(-result["bleu"])

    def run(self) -> dict[str, Any]:
        """Trains; returns a summary (steps, epochs, best valid BLEU, why it stopped, seconds)."""
        lengths = Corpus.padded_lengths(self.corpus.src, self.corpus.tgt)
        reason = "epochs"
        self.model.train()
        disable = None if self.show_progress is None else not self.show_progress
        with MetricsLog(self.out / "metrics.jsonl") as log:
            while self.epoch < self.config.epochs and reason == "epochs":
                batches = make_batches(lengths, self.config.seed, self.epoch, self.config.batch_tokens,
                                       self.config.batch_sentences)
                with Progress(len(batches), desc=f"epoch {self.epoch + 1}", initial=self.batch,
                              disable=disable) as progress:
                    reason = self._run_epoch(batches, log, progress)
        plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png",
                     f"{self.config.src}→{self.config.tgt} {self.config.attention}")
        return {"steps": self.step, "epochs": self.epoch, "best_valid_bleu": self.best_bleu,
                "stopped_by": reason, "seconds": round(self.budget.elapsed_s, 1)}

    def _run_epoch(self, batches: list[np.ndarray], log: MetricsLog, progress: Progress) -> str:
        """Trains the rest of an epoch -> "epochs" (go on), or why training stops."""
        start, tokens_seen, window = time.perf_counter(), 0, []
        for k in range(self.batch, len(batches)):
            loss, tokens = self.train_step(batches[k])
            self.batch = k + 1
            tokens_seen += tokens
            window.append(loss)
            progress.update(loss=loss, tokens=tokens)
            if self.step % 50 == 0:
                mean = sum(window) / len(window)
                log.write(split="train", step=self.step, epoch=self.epoch, loss=mean, ppl=perplexity(mean),
                          lr=self.schedule.last_lr[0],
                          tokens_per_s=round(tokens_seen / (time.perf_counter() - start), 1))
                window = []
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save("last.pt")
            if self._stop_requested():
                self.save("last.pt")
                self._validate(log, progress, count=False)
                return "max-steps" if self.config.max_steps and self.step >= self.config.max_steps \
                    else "time-budget"
        self.epoch, self.batch = self.epoch + 1, 0
        stop = self._validate(log, progress)
        self.save("last.pt")
        return "early-stopping" if stop else "epochs"


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False,
          show_progress: bool | None = None) -> dict[str, Any]:
    return Trainer(config, out_dir, resume, show_progress).run()
