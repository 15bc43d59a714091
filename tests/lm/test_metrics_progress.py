"""The metrics log, its plot, and the progress bar's text."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from lm.metrics import Figures, MetricsLog, plot_metrics, read_metrics
from lm.progress import Progress, format_postfix, perplexity


def test_metrics_log_appends_flushed_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(split="train", step=1, epoch=0, loss=2.0, ppl=math.exp(2.0), tokens_per_s=100.0)
    assert json.loads(path.read_text())["loss"] == 2.0  # readable before close: flushed
    log.close()
    with MetricsLog(path) as resumed:  # a resumed run continues the same file
        resumed.write(split="valid", step=1, epoch=0, loss=2.5, ppl=math.exp(2.5))
    with path.open("a") as handle:
        handle.write('{"split": "train", "st')  # a crash in the middle of a line
    assert [r["split"] for r in read_metrics(path)] == ["train", "valid"]


def test_plot_metrics_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 21):
            loss = 4.0 / step**0.3
            log.write(split="train", step=step, epoch=0, loss=loss, ppl=math.exp(loss))
            if step % 5 == 0:
                log.write(split="valid", step=step, epoch=0, loss=loss + 0.1, ppl=math.exp(loss + 0.1))
        log.write(split="train", step=21, epoch=0, loss=math.inf, ppl=math.inf)  # a diverged step is left out
    png = plot_metrics(path, tmp_path / "metrics.png", title="tiny run")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_postfix_shows_loss_perplexity_and_throughput() -> None:
    assert format_postfix(math.log(4.0), 12_345.0) == "loss 1.386 ppl 4.00 tok/s 12.3k"
    assert format_postfix(None, 850.0) == "tok/s 850"
    forecaster = Figures("MSE", "standardised units²", perplexity=False, rate="windows/s")
    assert format_postfix(0.25, 850.0, forecaster) == "MSE 0.250 windows/s 850"
    assert perplexity(1e6) == math.inf


def test_progress_bar_reports_to_its_stream() -> None:
    stream = io.StringIO()
    with Progress(total=4, desc="epoch 1", file=stream, disable=False) as bar:
        for _ in range(4):
            bar.update(loss=math.log(3.0), tokens=512)
        assert bar.tokens == 2048
        bar.write("valid ppl 2.9")
    text = stream.getvalue()
    assert "epoch 1" in text and "loss 1.099 ppl 3.00" in text and "tok/s" in text
    assert "4/4" in text and "valid ppl 2.9" in text
