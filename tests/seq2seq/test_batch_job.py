"""``rnnlab-mt translate --bundle``: order, bad lines, JSONL, a resume after a real kill, shards, BLEU."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seq2seq.cli import main
from serving.config import ServerConfig
from serving.harness import ServerThread
from serving.translator import SearchParams, Seq2SeqRuntime
from tests.committed_bundles import TRANSLATOR, committed
from tests.tiny_translators import pairs_lines, tiny_sources, tiny_translator

ROOT = Path(__file__).resolve().parents[2]
BAD = [b"", b"   ", b"word " * 200, b"caf\xe9 au lait", "Ok \u00e9t\u00e9.".encode()]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_translator(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def lines():
    """30 English lines with the bad ones spread among them (as bytes, one per input line)."""
    good = [line.split("\t")[0].encode() for line in pairs_lines()[400:425]]
    for position, bad in zip((0, 7, 13, 20, 29), BAD, strict=True):
        good.insert(position, bad)
    return good


def write_input(path, lines, final_newline=False):
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    return path


def run(args, capsys):
    status = main(["translate", *map(str, args)])
    return status, capsys.readouterr()


def expected_text(bundle, lines, beam=2):
    runtime = Seq2SeqRuntime.load(bundle)
    texts = [raw.decode("utf-8", errors="strict") if _utf8(raw) else "" for raw in lines]
    return [r.text for r in runtime.translate(texts, SearchParams(beam=beam))]


def _utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_text_job_keeps_order_and_one_line_per_input_line(bundle, lines, tmp_path, capsys):
    source = write_input(tmp_path / "in.txt", lines)  # no final newline: the last line still counts
    out = tmp_path / "out.txt"
    status, captured = run(
        [
            "--bundle",
            bundle,
            "--input",
            source,
            "--output",
            out,
            "--beam",
            2,
            "--batch-tokens",
            40,
            "--chunk-lines",
            7,
        ],
        capsys,
    )
    assert status == 0
    got = out.read_text(encoding="utf-8").split("\n")
    assert got[-1] == "" and len(got) - 1 == len(lines)
    assert got[:-1] == expected_text(bundle, lines)
    for number, reason in ((1, "empty line"), (8, "empty line"), (14, "too long"), (21, "not valid UTF-8")):
        assert f"line {number}: {reason}" in captured.err
    assert "translated 30 lines (4 failed)" in captured.err and "sentences/s" in captured.err
    assert not (tmp_path / "out.txt.progress").exists()


def test_workers_give_the_same_output_and_may_differ_on_resume(bundle, lines, tmp_path, capsys):
    """--workers is how the job runs, not what it writes: the output is byte-identical, and a job
    stopped with one worker count resumes with another."""
    source = write_input(tmp_path / "in.txt", lines * 3, final_newline=True)
    args = ["--bundle", bundle, "--input", source, "--beam", 2, "--batch-tokens", 30, "--chunk-lines", 40]
    assert run([*args, "--output", tmp_path / "one.txt"], capsys)[0] == 0
    assert run([*args, "--output", tmp_path / "two.txt", "--workers", 2], capsys)[0] == 0
    assert (tmp_path / "two.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
    half = tmp_path / "half.txt"
    progress = half.with_name(half.name + ".progress")
    head = (tmp_path / "one.txt").read_bytes().split(b"\n")[:40]
    half.write_bytes(b"\n".join(head) + b"\n")
    from serving.batch_job import JobConfig, args_hash
    from serving.files import atomic_write_json

    config = JobConfig(
        input=str(source),
        output=str(half),
        bundle=str(bundle),
        beam=2,
        batch_tokens=30,
        chunk_lines=40,
        workers=1,
    )
    digest = __import__("hashlib").sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()
    atomic_write_json(
        progress,
        {
            "version": 1,
            "args_hash": args_hash(config, f"bundle:{digest}"),
            "lines_done": 40,
            "output_bytes": half.stat().st_size,
        },
    )
    status, captured = run([*args, "--output", half, "--workers", 2], capsys)
    assert status == 0 and "resumed after line 40" in captured.err
    assert half.read_bytes() == (tmp_path / "one.txt").read_bytes() and not progress.exists()
    status, captured = run([*args, "--output", tmp_path / "x.txt", "--workers", 0], capsys)
    assert status == 2 and "--workers" in captured.err


def test_jsonl_in_and_out(bundle, tmp_path, capsys):
    items = [
        json.dumps({"id": "a", "text": "Hello."}),
        json.dumps({"text": "I am cold."}),
        "{not json",
        json.dumps({"id": 7, "text": ""}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(items) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    status, captured = run(["--bundle", bundle, "--input", source, "--output", out, "--beam", 2], capsys)
    assert status == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["a", "2", "3", "7"]
    assert records[0]["source"] == "Hello." and records[0]["translation"] and records[0]["score"] < 0
    assert "error" not in records[0] and records[2]["error"].startswith("not JSON")
    assert records[3]["error"] == "empty line"
    assert records[3]["translation"] == "" and records[3]["score"] is None
    assert "line 3: not JSON" in captured.err


def _job(bundle, out, *extra):
    return [
        sys.executable,
        "-m",
        "seq2seq.cli",
        "translate",
        "--bundle",
        str(bundle),
        "--output",
        str(out),
        "--beam",
        "2",
        "--chunk-lines",
        "5",
        *map(str, extra),
    ]


def test_resume_after_a_real_kill(bundle, lines, tmp_path, capsys):
    """The job reads stdin; once two chunks are on disk it blocks for input, and is killed (SIGKILL)."""
    out = tmp_path / "out.txt"
    sidecar = tmp_path / "out.txt.progress"
    data = b"\n".join(lines) + b"\n"
    job = subprocess.Popen(_job(bundle, out), cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    job.stdin.write(b"\n".join(lines[:12]) + b"\n")
    job.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sidecar.exists() and json.loads(sidecar.read_text())["lines_done"] == 10:
            break
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert json.loads(sidecar.read_text())["lines_done"] == 10
    assert len(out.read_bytes().splitlines()) == 10
    with open(out, "ab") as torn:  # as if the kill had hit the middle of the next chunk's write
        torn.write(b"half a chunk")
    other = subprocess.run(_job(bundle, out, "--beam", 3), cwd=ROOT, input=data, capture_output=True)
    assert other.returncode == 2 and b"other arguments" in other.stderr
    again = subprocess.run(_job(bundle, out), cwd=ROOT, input=data, capture_output=True)
    assert again.returncode == 0, again.stderr
    assert b"resumed after line 10" in again.stderr and not sidecar.exists()
    whole = tmp_path / "whole.txt"
    source = write_input(tmp_path / "in.txt", lines, final_newline=True)
    assert run(["--bundle", bundle, "--input", source, "--output", whole, "--beam", 2], capsys)[0] == 0
    assert out.read_bytes() == whole.read_bytes()


def test_shards_concatenate_to_the_whole_output(bundle, lines, tmp_path, capsys):
    source = write_input(tmp_path / "in.txt", lines, final_newline=True)
    whole = tmp_path / "whole.txt"
    assert run(["--bundle", bundle, "--input", source, "--output", whole, "--beam", 1], capsys)[0] == 0
    pieces = []
    for index in range(4):
        piece = tmp_path / f"part{index}.txt"
        assert (
            run(
                [
                    "--bundle",
                    bundle,
                    "--input",
                    source,
                    "--output",
                    piece,
                    "--beam",
                    1,
                    "--shard",
                    f"{index}/4",
                ],
                capsys,
            )[0]
            == 0
        )
        pieces.append(piece.read_bytes())
    assert [len(p.splitlines()) for p in pieces] == [7, 8, 7, 8]
    assert b"".join(pieces) == whole.read_bytes()


def test_bad_shard_is_a_usage_error(bundle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "--bundle", str(bundle), "--shard", "4/4"])
    assert exit_info.value.code == 2 and "need 0 <= I < N" in capsys.readouterr().err


def test_references_print_bleu_and_chrf(bundle, tmp_path, capsys):
    pairs = [line.split("\t") for line in pairs_lines()[:40]]
    source = tmp_path / "en.txt"
    source.write_text("".join(p[0] + "\n" for p in pairs), encoding="utf-8")
    references = tmp_path / "fr.txt"
    references.write_text("".join(p[1] + "\n" for p in pairs), encoding="utf-8")
    status, captured = run(
        ["--bundle", bundle, "--input", source, "--output", tmp_path / "hyp.txt", "--references", references],
        capsys,
    )
    assert status == 0
    line = next(x for x in captured.err.splitlines() if x.startswith("BLEU "))
    assert 0 <= float(line.split()[1]) <= 100 and 0 < float(line.split()[3]) <= 100
    assert "nrefs:1" in captured.err
    (tmp_path / "hyp.txt").rename(references)  # its own output as the references: a perfect score
    status, captured = run(
        ["--bundle", bundle, "--input", source, "--output", tmp_path / "hyp.txt", "--references", references],
        capsys,
    )
    assert re.search(r"^BLEU [0-9.]+ chrF 100.00$", captured.err, re.M)  # short outputs: few 4-grams


def test_job_level_errors_are_one_line(bundle, tmp_path, capsys):
    status, captured = run(
        ["--bundle", tmp_path / "missing", "--input", "-", "--output", tmp_path / "o"], capsys
    )
    assert status == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    status, captured = run(["--bundle", bundle, "--input", tmp_path / "none.txt"], capsys)
    assert status == 2 and "no such input file" in captured.err


def test_batch_job_through_the_server_equals_the_local_job(tmp_path, capsys):
    """``--server`` sends the lines to a running server's Translate; the output equals the local job's.

    (Here, not in tests/serving: building rnnlab-mt's parser imports the training code, so torch.)"""
    models = tmp_path / "models"
    shutil.copytree(committed(TRANSLATOR), models / TRANSLATOR)
    source = tmp_path / "in.txt"
    source.write_text("\n".join([*tiny_sources(20, start=700), "", "Go."]) + "\n", encoding="utf-8")
    local, remote = tmp_path / "local.txt", tmp_path / "remote.txt"
    assert (
        main(
            [
                "translate",
                "--bundle",
                str(models / TRANSLATOR),
                "--input",
                str(source),
                "--output",
                str(local),
            ]
        )
        == 0
    )
    with ServerThread(ServerConfig(models=str(models), port=0)) as server:
        target = f"127.0.0.1:{server.port}"
        assert (
            main(
                [
                    "translate",
                    "--server",
                    target,
                    "--model",
                    TRANSLATOR,
                    "--input",
                    str(source),
                    "--output",
                    str(remote),
                ]
            )
            == 0
        )
        assert remote.read_text() == local.read_text() and len(remote.read_text().splitlines()) == 22
        assert "line 21: empty line" in capsys.readouterr().err
        assert (
            main(
                [
                    "translate",
                    "--server",
                    target,
                    "--model",
                    "nope",
                    "--input",
                    str(source),
                    "--output",
                    str(tmp_path / "x.txt"),
                ]
            )
            == 2
        )
        assert "has no translator 'nope'" in capsys.readouterr().err
