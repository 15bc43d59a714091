"""A progress bar for training and evaluation: tqdm on stderr showing loss, perplexity, tokens/s, ETA."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm

from lm.metrics import NATS_PER_TOKEN, Figures


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an overflow error for a diverged loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def format_postfix(loss: float | None, tokens_per_s: float | None, figures: Figures = NATS_PER_TOKEN) -> str:
    """``"loss 1.234 ppl 3.43 tok/s 12.3k"`` (named by ``figures``: a forecaster's bar reads
    ``"Gaussian NLL 0.123 windows/s 850"``); the parts whose value is unknown are left out."""
    parts = []
    if loss is not None:
        parts.append(f"{figures.loss} {loss:.3f}")
        if figures.perplexity:
            parts.append(f"ppl {perplexity(loss):.2f}")
    if tokens_per_s is not None:
        rate = f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"
        parts.append(f"{figures.rate} {rate}")
    return " ".join(parts)


class Progress:
    """One bar over ``total`` units (batches or steps); tqdm computes the ETA from the rate of ``update``.

    ``update(n, loss=..., tokens=...)`` advances the bar and shows the latest loss, its perplexity and
    the mean throughput since the bar opened, named by ``figures`` (the training family's).
    ``disable=None`` hides the bar when stderr is not a terminal (tqdm's rule), True hides it always.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "train",
        unit: str = "batch",
        disable: bool | None = None,
        file: TextIO | None = None,
        initial: int = 0,
        figures: Figures = NATS_PER_TOKEN,
    ) -> None:
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=file or sys.stderr,
            disable=disable,
            initial=initial,
            dynamic_ncols=True,
            leave=False,
        )
        self.figures = figures
        self.tokens = 0
        self.loss: float | None = None
        self._start = time.perf_counter()

    @property
    def tokens_per_s(self) -> float | None:
        elapsed = time.perf_counter() - self._start
        return self.tokens / elapsed if self.tokens and elapsed > 0 else None

    def update(self, n: int = 1, *, loss: float | None = None, tokens: int = 0) -> None:
        self.tokens += tokens
        if loss is not None:
            self.loss = loss
        self.bar.set_postfix_str(format_postfix(self.loss, self.tokens_per_s, self.figures), refresh=False)
        self.bar.update(n)

    def write(self, message: str) -> None:
        """Prints a line above the bar without breaking it."""
        self.bar.write(message, file=getattr(self.bar, "fp", sys.stderr))  # a disabled bar has no fp

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
