"""Job arrays: `rnnlab-mt translate --shard auto` tasks killed and resumed at random; `rnnlab-mt merge`."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seq2seq.cli import main
from serving.job_array import ShardError, progress_path, shard_from_env, shard_path
from tests.tiny_translators import tiny_sources, tiny_translator

ROOT = Path(__file__).resolve().parents[2]
ARRAY_VARS = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_translator(tmp_path_factory)[1]


@pytest.fixture
def source(tmp_path):
    """180 real English lines and two bad ones (an empty line, a non-UTF-8 one): each shard sees failures."""
    lines = [line.encode() for line in tiny_sources(180, start=300)]
    lines[40:40] = [b""]
    lines[130:130] = [b"caf\xe9"]
    path = tmp_path / "in.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_shard_from_the_environment():
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    # sbatch --array=1-4 numbers tasks from 1; --array=0-6:2 steps by 2
    assert shard_from_env(
        {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    ) == (0, 4)
    assert shard_from_env(
        {
            "SLURM_ARRAY_TASK_ID": "6",
            "SLURM_ARRAY_TASK_COUNT": "4",
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_STEP": "2",
        }
    ) == (3, 4)
    assert shard_from_env({"JOB_COMPLETION_INDEX": "5"}, count=8) == (5, 8)
    refusals = [
        ({}, None, "no array task in the environment"),
        ({"JOB_COMPLETION_INDEX": "0"}, None, "needs --shard-count"),
        ({"JOB_COMPLETION_INDEX": "8"}, 8, "not below --shard-count 8"),
        ({"JOB_COMPLETION_INDEX": "x"}, 8, "not an integer"),
        ({"SLURM_ARRAY_TASK_ID": "3"}, None, "SLURM_ARRAY_TASK_COUNT is not"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "2"}, None, "not one of 2 tasks"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, 3, "disagrees"),
    ]
    for environ, count, message in refusals:
        with pytest.raises(ShardError, match=message):
            shard_from_env(environ, count)


def test_shard_auto_outside_an_array_is_one_error_line(bundle, source, tmp_path, capsys, monkeypatch):
    for name in ARRAY_VARS:
        monkeypatch.delenv(name, raising=False)
    status = main(
        [
            "translate",
            "--bundle",
            str(bundle),
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out.txt"),
            "--shard",
            "auto",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: --shard auto: no array task") and err.count("\n") == 1
    assert "SLURM_ARRAY_TASK_ID" in err and "JOB_COMPLETION_INDEX" in err
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    status = main(
        [
            "translate",
            "--bundle",
            str(bundle),
            "--input",
            str(source),
            "--shard",
            "auto",
            "--shard-count",
            "2",
        ]
    )
    assert status == 2 and "needs --output G" in capsys.readouterr().err
    assert not list(tmp_path.glob("out.txt*"))


def _task(bundle, source, out, environ, *extra):
    """One array task as the scheduler would start it: same command line, its own environment."""
    env = {k: v for k, v in os.environ.items() if k not in ARRAY_VARS} | environ
    command = [
        sys.executable,
        "-m",
        "seq2seq.cli",
        "translate",
        "--bundle",
        str(bundle),
        "--input",
        str(source),
        "--output",
        str(out),
        "--beam",
        "2",
        "--chunk-lines",
        "4",
        "--batch-tokens",
        "60",
        "--shard",
        "auto",
        *extra,
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _merge(out, *parts):
    return subprocess.run(
        [sys.executable, "-m", "seq2seq.cli", "merge", "--output", str(out), *map(str, parts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _lines_done(out, shard):
    try:
        return json.loads(progress_path(shard_path(out, shard)).read_text())["lines_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_at(task, out, shard, lines, deadline):
    """SIGKILLs the task once its shard has ``lines`` lines on disk (or at once when lines == 0)."""
    while task.poll() is None and _lines_done(out, shard) < lines and time.monotonic() < deadline:
        time.sleep(0.005)
    if task.poll() is None:
        task.kill()
    task.wait()
    return task.returncode == -signal.SIGKILL


def test_array_tasks_killed_and_resumed_at_random_merge_to_the_unsharded_output(bundle, source, tmp_path):
    """3 Slurm array tasks (ids 1-3) run at once; each is SIGKILLed at a random point (two of them twice,
    one before its first chunk), restarted, and the merge of the shards equals one unsharded job."""
    rng = random.Random(17)
    out, count = tmp_path / "out.txt", 3
    whole = tmp_path / "whole.txt"
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "seq2seq.cli",
            "translate",
            "--bundle",
            str(bundle),
            "--input",
            str(source),
            "--output",
            str(whole),
            "--beam",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    environs = [
        {"SLURM_ARRAY_TASK_ID": str(i + 1), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_MIN": "1"}
        for i in range(count)
    ]
    # kill points in lines done (shards have 60-61 lines, chunks of 4); 0 = before any output
    schedules = [
        [0, rng.randrange(8, 56)],
        [rng.randrange(4, 28), rng.randrange(32, 56)],
        [rng.randrange(8, 56)],
    ]
    deadline = time.monotonic() + 240
    kills = 0
    tasks = [_task(bundle, source, out, env) for env in environs]
    for attempt in range(2):
        for index, task in enumerate(tasks):
            if attempt < len(schedules[index]):
                kills += _kill_at(task, out, (index, count), schedules[index][attempt], deadline)
        if attempt == 0:
            refused = _merge(out)
            assert refused.returncode == 2 and refused.stderr.startswith("error: cannot merge: ")
            assert "unfinished" in refused.stderr and not out.exists()
        tasks = [
            _task(bundle, source, out, env) if tasks[i].returncode not in (None, 0) else tasks[i]
            for i, env in enumerate(environs)
        ]
    for task in tasks:
        assert task.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, task.stderr.read()
    assert kills >= 4  # a task may finish before its later kill point: most kills must land
    records = [json.loads(progress_path(shard_path(out, (i, count))).read_text()) for i in range(count)]
    assert [r["complete"] for r in records] == [True] * count
    assert [r["lines_total"] for r in records] == [60, 61, 61]
    merged = _merge(out)
    assert merged.returncode == 0, merged.stderr
    assert "merged 3 shards, 182 lines" in merged.stderr
    assert out.read_bytes() == whole.read_bytes()
    # a finished task started again (a scheduler retry) has nothing left to do, and changes nothing
    again = _task(bundle, source, out, environs[1])
    assert again.wait(timeout=60) == 0 and b"resumed after line 61" in again.stderr.read()
    assert _merge(out).returncode == 0 and out.read_bytes() == whole.read_bytes()


def test_indexed_job_shards_and_every_merge_refusal(bundle, source, tmp_path):
    """Kubernetes Indexed Job (JOB_COMPLETION_INDEX + --shard-count); merge names each bad shard."""
    out = tmp_path / "out.txt"
    for index in (0, 2):
        task = _task(bundle, source, out, {"JOB_COMPLETION_INDEX": str(index)}, "--shard-count", "3")
        assert task.wait(timeout=120) == 0, task.stderr.read()
    refused = _merge(out)
    assert refused.returncode == 2 and f"{shard_path(out, (1, 3))} missing" in refused.stderr
    assert refused.stderr.count("\n") == 1
    task = _task(bundle, source, out, {"JOB_COMPLETION_INDEX": "1"}, "--shard-count", "3")
    assert task.wait(timeout=120) == 0
    parts = [shard_path(out, (i, 3)) for i in range(3)]
    assert _merge(out, *reversed(parts)).returncode == 0  # explicit files, any order: merged in shard order
    merged = out.read_bytes()
    assert merged == b"".join(p.read_bytes() for p in parts)
    foreign = tmp_path / "other.txt"  # shard 1 of another job (other beam) given in place of ours
    task = subprocess.run(
        [
            sys.executable,
            "-m",
            "seq2seq.cli",
            "translate",
            "--bundle",
            str(bundle),
            "--input",
            str(source),
            "--output",
            str(foreign),
            "--beam",
            "1",
            "--shard",
            "1/3",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert task.returncode == 0, task.stderr
    refused = _merge(tmp_path / "mixed.txt", parts[0], foreign, parts[2])
    assert (
        refused.returncode == 2 and "is from another job" in refused.stderr and "shard 1/3" in refused.stderr
    )
    with open(parts[2], "ab") as changed:
        changed.write(b"extra\n")
    refused = _merge(out)
    assert refused.returncode == 2 and "changed since it finished" in refused.stderr
    assert out.read_bytes() == merged  # a refused merge leaves the old output alone
    unrecorded = tmp_path / "plain.txt"
    unrecorded.write_text("x\n")
    refused = _merge(tmp_path / "m2.txt", unrecorded)
    assert refused.returncode == 2 and "has no .progress record" in refused.stderr
    assert "no shards" in _merge(tmp_path / "nothing.txt").stderr
