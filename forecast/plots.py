"""PNG figures of a forecaster (matplotlib, Agg): forecast against truth with the interval, the error by
steps ahead (one-step vs recursive k-step, note 002's figure), and the hidden-state PCA (note 003's).

The loss curve is the training loop's metrics.png (lm.loop); ``loss_curve`` draws one from a plain list
of losses for code outside the loop (bench/ts_notes.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def forecast_figure(
    path: str | Path,
    title: str,
    history: np.ndarray,
    start: int,
    pred: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    steps: dict[str, Sequence[float]],
    context: int,
) -> Path:
    """history: (N,) truth; pred, lo, hi: (n,) one-step forecasts of history[start : start + n] with the
    90% interval; steps: {label: MAE by step ahead}; context: points shown before ``start``."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = np.arange(start, start + len(pred))
    a.plot(np.arange(len(history)), history, color="k", lw=0.8, label="truth")
    a.plot(t, pred, label="one-step forecast")
    a.fill_between(t, lo, hi, alpha=0.3, label="90% interval")
    first = max(start - context, 0)
    a.set_xlim(first, len(history))
    shown = np.concatenate([history[first:], lo, hi])  # the y range of what is shown, not the whole series
    margin = 0.05 * (shown.max() - shown.min() + 1e-12)
    a.set_ylim(shown.min() - margin, shown.max() + margin)
    a.set_xlabel("time index")
    a.legend()
    for label, values in steps.items():
        b.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
    b.set_xlabel("steps ahead")
    b.set_ylabel("MAE")
    b.legend()
    fig.suptitle(title)
    return _save(fig, path)


def error_growth_figure(path: str | Path, title: str, errors: dict[str, dict[int, float]]) -> Path:
    """errors: {label: {k: error of k-step forecasts}} on log-x axes (002: k = 1, 4, 16, 64)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_k in errors.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (steps ahead)")
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def principal_components(states: np.ndarray, count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """states: (n, hidden) -> coordinates (n, count) on the first principal axes and the share of the
    variance each axis explains (count,); numpy SVD of the centred states."""
    centred = states - states.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    return centred @ axes[:count].T, variance[:count] / max(variance.sum(), 1e-12)


def hidden_pca_figure(
    path: str | Path, title: str, states: np.ndarray, colour: np.ndarray, label: str
) -> Path:
    """states: (n, hidden) hidden states in time order, coloured by ``colour`` (n,) (time or value)."""
    plt = _pyplot()
    coords, share = principal_components(states)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(coords[:, 0], coords[:, 1], color="0.8", lw=0.6, zorder=1)
    dots = ax.scatter(coords[:, 0], coords[:, 1], c=colour, s=10, cmap="viridis", zorder=2)
    fig.colorbar(dots, ax=ax, label=label)
    ax.set_xlabel(f"PC1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC2 ({share[1]:.0%})" if len(share) > 1 else "PC2")
    ax.set_title(title)
    return _save(fig, path)


def loss_curve(path: str | Path, title: str, losses: dict[str, Sequence[float]], xlabel: str) -> Path:
    """losses: {label: values per epoch or step} on a log-y axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in losses.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
