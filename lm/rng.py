"""Seeding and capturing the global random number generators (python, numpy, torch CPU).

The captured state holds only lists, ints, floats and tensors, so it round-trips through
``torch.load(weights_only=True)`` inside a checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds python ``random``, the numpy global generator and the torch CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding accepts only 32-bit seeds
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of the three global generators as plain data (see module docstring)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "kind": str(np_kind),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` returned; the next draws repeat the captured ones."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
