"""The translator's settings, torch-free: the network (``Seq2SeqConfig``) and ``rnnlab-mt train``'s config
sections (data, model, optim, run), from which ``rnnlab-mt`` builds its flags without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lm.config import OptimConfig, RunConfig, Sections, check_fields, section_of, setting, with_defaults
from seq2seq.data import DataConfig

ATTENTIONS = ("additive", "none")


@dataclass
class Seq2SeqConfig:
    """The network of seq2seq.model.Seq2Seq (the model section of ``rnnlab-mt train`` without the
    vocabularies and the padding id)."""

    src_vocab: int
    tgt_vocab: int
    embed: int = setting(256, "embedding size (both sides)")
    enc_hidden: int = setting(256, "encoder state size per direction (a bidirectional encoder has twice)")
    dec_hidden: int = setting(256, "decoder state size")
    layers: int = setting(1, "GRU layers of encoder and decoder")
    bidirectional: bool = setting(True, "bidirectional encoder")
    attention: str = setting("additive", "additive (Bahdanau), or none (classic)", choices=ATTENTIONS)
    attn_dim: int = setting(256, "attention key/query size")
    dropout: float = setting(0.2, "dropout on embeddings and outputs")
    tie: bool = setting(True, "tie the decoder's input embedding to its output projection (read-out: embed)")
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        if (
            min(
                self.src_vocab,
                self.tgt_vocab,
                self.embed,
                self.enc_hidden,
                self.dec_hidden,
                self.layers,
                self.attn_dim,
            )
            < 1
        ):
            raise ValueError("vocabulary sizes, embed, hidden sizes, layers and attn_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    @property
    def memory_features(self) -> int:
        """C: features of one encoder output."""
        return self.enc_hidden * (2 if self.bidirectional else 1)

    @property
    def enc_out_features(self) -> int:
        """E': features of one ``enc_out`` slot (memory, plus the attention key with attention)."""
        return self.memory_features + (self.attn_dim if self.attention == "additive" else 0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MTDataConfig(DataConfig):
    """The pairs (seq2seq.data.DataConfig), their sentencepiece models, and the batches."""

    spm_vocab: int = setting(
        4000, "sentencepiece pieces per side (with --joint-spm: of the shared model)", minimum=8
    )
    spm_type: str = setting("unigram", "sentencepiece model type", choices=("unigram", "bpe"))
    joint_spm: bool = setting(False, "one sentencepiece model for both languages")
    max_len: int = setting(
        64, "training pairs with more tokens than this on either side are skipped", minimum=1
    )
    batch_tokens: int = setting(4000, "budget per batch: sentences x longest padded length", minimum=1)
    batch_sentences: int = setting(0, "> 0: also at most this many sentences per batch", minimum=0)
    valid_bleu_sentences: int = setting(
        500, "valid sources scored by greedy BLEU at each validation", minimum=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self)


MTModelConfig = section_of(
    Seq2SeqConfig,
    "MTModelConfig",
    "The network (Seq2SeqConfig).",
    exclude=("src_vocab", "tgt_vocab", "pad_id"),
)


@dataclass
class MTOptimConfig(
    with_defaults(
        OptimConfig,
        "_MTOptim",
        lr=2e-3,
        lr_schedule="noam",  # type: ignore[misc]
        warmup_steps=200,
        seed=1,
    )
):
    """How the weights move (the translator's recipe: AdamW, noam schedule); fixed on resume."""

    label_smoothing: float = setting(
        0.1, "label smoothing of the training loss (the logged loss has none)", minimum=0
    )


MTRunConfig = with_defaults(RunConfig, "MTRunConfig", max_minutes=55.0, log_every=50)


@dataclass
class TrainConfig(Sections):
    """``rnnlab-mt train``: data, model, optim, run."""

    data: MTDataConfig = field(default_factory=MTDataConfig)
    model: Any = field(default_factory=MTModelConfig)
    optim: MTOptimConfig = field(default_factory=MTOptimConfig)
    run: Any = field(default_factory=MTRunConfig)

    def __post_init__(self) -> None:
        self.model_config(1, 1)

    def model_config(self, src_vocab: int, tgt_vocab: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(src_vocab=src_vocab, tgt_vocab=tgt_vocab, **self.section("model"))

    def data_config(self) -> DataConfig:
        return self.data

    @property
    def src(self) -> str:
        return self.data.src

    @property
    def tgt(self) -> str:
        return self.data.tgt
