"""Training metrics: one JSON line per record, and a PNG of the loss and a second figure against step
(perplexity for the language models and the translator; a family names its figures in ``Figures``)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class Figures:
    """What a training family's logged figures are, named once (``Family.figures``, lm/loop.py): the
    plot's axes, the progress bar and the valid lines on stderr use these names."""

    loss: str = "loss"
    """The loss's name (records keep the key ``loss``)."""
    unit: str = "nats/token"
    perplexity: bool = True
    """The loss is a mean NLL per token, so exp(loss) is a perplexity: records carry ``ppl``, the bar and
    the valid lines show it."""
    panel: tuple[str, str] = ("ppl", "perplexity")
    """(record key, y label) of the plot's second panel (log scale for ``ppl``)."""
    rate: str = "tok/s"
    """Throughput on the bar: what ``StepLoss.tokens`` counts, per second."""

    @property
    def loss_label(self) -> str:
        return f"{self.loss} ({self.unit})"


NATS_PER_TOKEN = Figures()
"""The language models' and the translator's figures: loss in nats/token and its perplexity."""


class MetricsLog:
    """Appends records to a JSON-lines file, flushing each one so a crash loses at most the last line.

    Records carry ``split`` ("train"|"valid"), ``step``, ``epoch``, ``loss``, ``ppl``, ``tokens_per_s``
    and anything else the caller adds. Opening an existing file appends (a resumed run continues it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO = self.path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a crash mid-write) is ignored."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    points = [
        (r["step"], r[key])
        for r in records
        if r.get("split") == split and key in r and r[key] is not None and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(
    jsonl_path: str | Path, png_path: str | Path, title: str = "", figures: Figures = NATS_PER_TOKEN
) -> Path:
    """Draws the loss and ``figures.panel`` (perplexity: log scale) of the train and valid splits against
    step into a PNG, whose ``Description`` text chunk holds the two y labels ("left | right").

    Uses the Agg canvas directly, so no display and no global matplotlib backend switch are needed.
    The PNG is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    panels = [("loss", figures.loss_label), figures.panel]
    for column, (key, label) in enumerate(panels):
        axes = figure.add_subplot(1, 2, column + 1)
        for split, style in (("train", "-"), ("valid", "o-")):
            steps, values = _series(records, split, key)
            if steps:
                axes.plot(steps, values, style, label=split, markersize=3)
        if key == "ppl" and any(_series(records, s, key)[1] for s in ("train", "valid")):
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    png_path = Path(png_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            labels = " | ".join(label for _, label in panels)
            figure.savefig(handle, format="png", metadata={"Title": title, "Description": labels})
        os.replace(tmp, png_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png_path
