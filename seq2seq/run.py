"""Loading a trained translator from its run directory (for eval, translate and the ONNX export)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.checkpoint import CheckpointError, load_checkpoint
from seq2seq.decode import Translator
from seq2seq.model import Seq2Seq, Seq2SeqConfig
from seq2seq.train import CHECKPOINT_KIND, TrainConfig
from serving.text import normalize
from serving.tokenizers import SentencePieceTokenizer, tokenizer_from_dict

WHICH = ("best", "last")


@dataclass
class LoadedRun:
    model: Seq2Seq
    """In eval mode."""
    src_tokenizer: SentencePieceTokenizer
    tgt_tokenizer: SentencePieceTokenizer
    model_config: Seq2SeqConfig
    train_config: dict[str, Any]
    evaluation: dict[str, Any] | None
    """The last ``rnnlab-mt eval`` result (RUN_DIR/eval.json), if any."""

    def translator(self, max_src_tokens: int | None = None) -> Translator:
        """Text in, text out, with the training normalisation (and lowercasing if trained so)."""
        data = TrainConfig.from_dict(self.train_config, strict=False).data
        return Translator(
            self.model,
            self.src_tokenizer,
            self.tgt_tokenizer,
            max_src_tokens or 2 * data.max_len,
            normalize_fn=lambda text: normalize(text, data.lowercase),
        )


def load_run(run_dir: str | Path, which: str = "best") -> LoadedRun:
    """Raises CheckpointError (one line, naming the file) when the run cannot be loaded."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, not {which!r}")
    path = Path(run_dir) / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (is {run_dir} a translation run directory?)")
    payload = load_checkpoint(path, CHECKPOINT_KIND)
    try:
        config = Seq2SeqConfig(**payload["model_config"])
        model = Seq2Seq(config)
        model.load_state_dict(payload["model"])
        src_tok = tokenizer_from_dict(payload["src_tokenizer"])
        tgt_tok = tokenizer_from_dict(payload["tgt_tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a usable translation checkpoint ({exc})") from None
    if not (isinstance(src_tok, SentencePieceTokenizer) and isinstance(tgt_tok, SentencePieceTokenizer)):
        raise CheckpointError(f"{path}: translation runs need sentencepiece tokenizers")
    eval_path = Path(run_dir) / "eval.json"
    evaluation = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
    return LoadedRun(model.eval(), src_tok, tgt_tok, config, payload["train_config"], evaluation)
