"""Tiny trained language models and their exported bundles, for tests across the suite.

``make_tiny_bundle(tmp_path, cell="gru")`` trains a char model for a few dozen steps on a short text
(about 0.3 s) and exports it to ``tmp_path / name``. The ``tiny_bundle`` fixture in tests/conftest.py
caches one bundle per argument set for the session and hands each test its own copy.
"""

from __future__ import annotations

from pathlib import Path

TINY_TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite\n"
    "matter to us. His grey eyes shone and twinkled, and his usually pale face was flushed and\n"
    "animated. The fire burned brightly, and the soft radiance of the incandescent lights in the\n"
    "lilies of silver caught the bubbles that flashed and passed in our glasses. Our chairs, being\n"
    "his patents, embraced and caressed us rather than submitted to be sat upon, and there was that\n"
    "luxurious after-dinner atmosphere when thought roams gracefully free of the trammels of\n"
    "precision. And he put it to us in this way, marking the points with a lean forefinger, as we\n"
    "sat and lazily admired his earnestness over this new paradox, as we thought it, and his\n"
    "fecundity.\n"
)


def train_tiny_model(
    cell: str = "gru",
    *,
    layers: int = 1,
    hidden: int = 32,
    embed: int = 16,
    steps: int = 60,
    seed: int = 0,
    impl: str = "fused",
    text: str = TINY_TEXT,
):
    """A char RNNLM trained ``steps`` Adam steps on random windows of ``text`` -> (eval model, tokenizer)."""
    import torch
    from torch.nn import functional as F

    from lm.model import RNNLM, ModelConfig
    from serving.tokenizers import CharTokenizer

    torch.manual_seed(seed)
    tokenizer = CharTokenizer.train(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    model = RNNLM(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            cell=cell,
            layers=layers,
            embed=embed,
            hidden=hidden,
            dropout=0.0,
            impl=impl,
        )
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    window, batch = 32, 8
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (batch,), generator=gen)
        rows = starts[:, None] + torch.arange(window + 1)[None, :]
        x, y = ids[rows[:, :-1]], ids[rows[:, 1:]]
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval(), tokenizer


def make_tiny_bundle(
    tmp_path: Path,
    cell: str = "gru",
    *,
    layers: int = 1,
    hidden: int = 32,
    embed: int = 16,
    steps: int = 60,
    seed: int = 0,
    impl: str = "fused",
    quantize: str | None = None,
    name: str = "tiny",
    text: str = TINY_TEXT,
) -> Path:
    """Trains a tiny char model (see ``train_tiny_model``) and exports it -> the bundle dir tmp_path/name."""
    from lm.export import export_lm

    model, tokenizer = train_tiny_model(
        cell, layers=layers, hidden=hidden, embed=embed, steps=steps, seed=seed, impl=impl, text=text
    )
    evaluation = {"split": "train", "note": "tiny test model"}
    training_config = {"steps": steps, "seed": seed, "lr": 0.02, "text_chars": len(text)}
    return export_lm(
        model,
        tokenizer,
        Path(tmp_path) / name,
        evaluation=evaluation,
        training_config=training_config,
        quantize=quantize,
    )
