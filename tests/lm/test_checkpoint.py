"""Checkpoints: full training state round-trips; broken, foreign and hostile files are refused by name."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lm.rng import capture_rng_state, restore_rng_state, seed_everything
from lm.schedule import EarlyStopping, make_lr_scheduler


def _training_state() -> dict:
    """What a trainer saves: model, Adam state after one step, schedule, early stopping, RNG states."""
    seed_everything(3)
    model = torch.nn.GRU(4, 8, num_layers=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = make_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
    model(torch.randn(5, 2, 4))[0].sum().backward()
    optimizer.step()
    schedule.step()
    generator = torch.Generator().manual_seed(7)
    return {
        "kind": "lm",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "early_stopping": EarlyStopping(2).state_dict(),
        "rng": capture_rng_state(),
        "data_generator": generator.get_state(),
        "epoch": 1,
        "step": 1,
        "best": None,
        "model_config": {"cell": "gru", "hidden": 8},
    }


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_round_trip_restores_model_optimizer_and_random_streams(tmp_path: Path) -> None:
    state = _training_state()
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    expected = _draws()  # what a run continuing from the saved moment draws next

    loaded = load_checkpoint(path, "lm")
    assert (loaded["format"], loaded["version"], loaded["kind"]) == ("rnnlab-checkpoint", 1, "lm")
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    optimizer = torch.optim.Adam(torch.nn.GRU(4, 8, num_layers=2).parameters(), lr=1e-2)
    optimizer.load_state_dict(loaded["optimizer"])
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["scheduler"] == state["scheduler"]
    assert loaded["model_config"] == {"cell": "gru", "hidden": 8}
    restore_rng_state(loaded["rng"])
    assert _draws() == expected
    generator = torch.Generator().set_state(loaded["data_generator"])
    assert torch.equal(generator.get_state(), state["data_generator"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_overwrite_is_atomic_and_a_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"kind": "lm", "step": 1})
    save_checkpoint(path, {"kind": "lm", "step": 2})
    assert load_checkpoint(path, "lm")["step"] == 2
    with pytest.raises(CheckpointError, match=r"best\.pt: cannot save payload\['bad'\] of type builtins"):
        save_checkpoint(path, {"kind": "lm", "step": 3, "bad": lambda: 0})
    assert load_checkpoint(path, "lm")["step"] == 2
    blocker = tmp_path / "dir.pt"  # os.replace onto a non-empty directory fails after the tmp file exists
    blocker.mkdir()
    (blocker / "x").write_text("x")
    with pytest.raises(CheckpointError, match=r"dir\.pt: cannot write"):
        save_checkpoint(blocker, {"kind": "lm"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "dir.pt"]


def test_payload_must_be_loadable_without_running_code(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}})
    # numpy scalars pass for floats but weights_only loading refuses them: caught when saving, by key
    with pytest.raises(CheckpointError, match=r"payload\['best'\]\['loss'\] of type numpy\.float64"):
        save_checkpoint(tmp_path / "x.pt", {"kind": "lm", "best": {"loss": np.float64(1.5)}})
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_files_are_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"kind": "lm", "weights": torch.arange(4096, dtype=torch.float32)})
    data = bytearray(path.read_bytes())
    if damage == "flip":  # inside the tensor data: torch's own reader would not notice
        middle = len(data) // 2
        data[middle] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"run\.pt: (corrupt|not an rnnlab)"):
        load_checkpoint(path, "lm")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model": torch.zeros(2)}, plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    for path in (plain, text):
        with pytest.raises(CheckpointError, match=rf"{path.name}: (not an rnnlab checkpoint|corrupt)"):
            load_checkpoint(path, "lm")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt", "lm")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path, "lm")


class _Hostile:
    """Unpickling this would create a directory: proof that code in the file ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.makedirs, (str(self.target),)


def test_code_in_a_file_never_runs(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "rnnlab-checkpoint", "version": 1, "kind": "lm", "x": _Hostile(victim)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not an rnnlab checkpoint"):
        load_checkpoint(path, "lm")
    assert not victim.exists()


def test_wrong_kind_and_version_are_named(tmp_path: Path) -> None:
    path = tmp_path / "mt.pt"
    save_checkpoint(path, {"kind": "mt"})
    with pytest.raises(CheckpointError, match=r"mt\.pt: is a 'mt' checkpoint, expected 'lm'"):
        load_checkpoint(path, "lm")
    assert load_checkpoint(path, "mt")["kind"] == "mt"
    future = tmp_path / "future.pt"
    torch.save({"format": "rnnlab-checkpoint", "version": 2, "kind": "lm"}, future)
    with pytest.raises(CheckpointError, match=r"future\.pt: unsupported checkpoint version 2"):
        load_checkpoint(future, "lm")
