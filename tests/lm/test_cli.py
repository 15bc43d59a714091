"""The rnnlab-lm command line: bad input gives one `error:` line, a non-zero exit and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.checkpoint import save_checkpoint
from lm.cli import main
from tests.lm.conftest import TINY_FLAGS

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_unknown_corpus_lists_the_known_ones(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--corpus", "no-such-corpus", "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_error_line(err, "no-such-corpus", "timemachine", "tinyshakespeare")
    assert not (tmp_path / "run").exists()


def test_checksum_mismatch_from_the_mirror(capsys, tmp_path: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "timemachine.txt").write_text("not the time machine")
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("RNNLAB_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "data", "fetch", "timemachine")
    assert code == 2
    assert_one_error_line(err, "checksum mismatch")
    assert not list((tmp_path / "cache").glob("timemachine*"))


def test_data_list_and_fetch(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RNNLAB_CACHE", str(tmp_path / "cache"))
    code, out, _ = run_cli(capsys, "data", "list")
    assert code == 0 and "timemachine" in out and "fra-eng" in out
    code, out, _ = run_cli(capsys, "data", "fetch", "timemachine")
    assert code == 0 and Path(out.strip()).read_text(encoding="utf-8").count("Time Traveller") > 10


def test_corpus_too_short_and_not_utf8(capsys, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few characters here " * 3)
    code, _, err = run_cli(capsys, "train", "--corpus", str(short), "--out", str(tmp_path / "a"), *TINY_FLAGS)
    assert code == 2
    assert_one_error_line(err, "too short", "batch-size 4 x bptt 16")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait " * 500)
    code, _, err = run_cli(capsys, "train", "--corpus", str(latin1), "--out", str(tmp_path / "b"))
    assert code == 2
    assert_one_error_line(err, "latin1.txt", "offset 3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tie", "--embed", "8", "--hidden", "16"], "--tie needs embed == hidden"),
        (["--bptt", "0"], "--bptt must be >= 1"),
        (["--cell", "transformer"], "invalid choice"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--lr", "fast"], "invalid float value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_invalid_flags_are_usage_errors(capsys, tmp_path: Path, corpus_file: Path, flags, message) -> None:
    out = str(tmp_path / "r")
    code, _, err = run_cli(capsys, "train", "--corpus", str(corpus_file), "--out", out, *flags)
    assert code == 2
    assert_one_error_line(err, message)
    assert not (tmp_path / "r").exists()


def test_resume_rules(capsys, tmp_path: Path, tiny_run: Path, corpus_file: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "none"), "--resume")
    assert code == 2
    assert_one_error_line(err, "holds no run")
    code, _, err = run_cli(capsys, "train", "--corpus", str(corpus_file), "--out", str(tiny_run))
    assert code == 2
    assert_one_error_line(err, "already holds a run", "--resume")
    code, _, err = run_cli(capsys, "train", "--out", str(tiny_run), "--resume", "--hidden", "64")
    assert code == 2
    assert_one_error_line(err, "--resume cannot change --hidden")


def test_corrupt_and_foreign_checkpoints(capsys, tmp_path: Path, tiny_run: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = bytearray((tiny_run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "best.pt").write_bytes(bytes(data))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {}}, foreign / "best.pt")
    wrong_kind = tmp_path / "wrong_kind"
    wrong_kind.mkdir()
    save_checkpoint(wrong_kind / "best.pt", {"kind": "mt", "model": {}})
    for run_dir, fragment in (
        (corrupt, "corrupt"),
        (foreign, "not an rnnlab checkpoint"),
        (wrong_kind, "expected 'lm'"),
        (tmp_path / "missing", "no such run directory"),
    ):
        for command in (["eval", str(run_dir)], ["generate", str(run_dir), "--prompt", "The"]):
            code, out, err = run_cli(capsys, *command)
            assert code == 2 and out == ""
            assert_one_error_line(err, fragment)


def test_generate_flag_errors(capsys, tiny_run: Path) -> None:
    code, _, err = run_cli(capsys, "generate", str(tiny_run), "--prompt", "The", "--temperature", "-1")
    assert code == 2
    assert_one_error_line(err, "temperature")
    code, _, err = run_cli(capsys, "generate", str(tiny_run), "--prompt", "")
    assert code == 2
    assert_one_error_line(err, "empty")


def test_train_with_scratch_cells_then_generate(capsys, tmp_path: Path, corpus_file: Path) -> None:
    code, _, _ = run_cli(
        capsys,
        "train",
        "--corpus",
        str(corpus_file),
        "--out",
        str(tmp_path / "run"),
        *TINY_FLAGS,
        "--impl",
        "scratch",
        "--cell",
        "lstm",
        "--epochs",
        "1",
        "--bptt",
        "8",
    )
    assert code == 0
    code, out, _ = run_cli(
        capsys,
        "generate",
        str(tmp_path / "run"),
        "--prompt",
        "The",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    )
    assert code == 0 and len(out) == 6


def test_the_installed_entry_point_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lm.cli", "eval", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc.stderr, "no such run directory")
