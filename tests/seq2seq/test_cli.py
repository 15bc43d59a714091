import io
import json
import sys

from seq2seq.cli import main


def test_eval_prints_sacrebleu_scores_and_writes_hypotheses(trained_run, tmp_path, capsys):
    hyp_out = tmp_path / "hyp.txt"
    code = main(
        [
            "eval",
            str(trained_run),
            "--split",
            "test",
            "--beam",
            "2",
            "--json",
            "--limit",
            "30",
            "--hyp-out",
            str(hyp_out),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    fields = {"bleu", "chrf", "bleu_signature", "chrf_signature", "sentences", "references", "hyp_file"}
    assert fields <= set(result)
    assert result["bleu_signature"].startswith("nrefs:var|")  # several references, a varying number
    assert "version:2." in result["bleu_signature"] and result["chrf_signature"].startswith("nrefs:")
    assert result["sentences"] == 30 and result["references"] >= 30 and 0 <= result["bleu"] <= 100
    assert len(hyp_out.read_text(encoding="utf-8").splitlines()) == 30
    assert json.loads((trained_run / "eval.json").read_text())["bleu"] == result["bleu"]


def test_translate_gives_one_output_line_per_input_line_even_for_bad_ones(trained_run, monkeypatch, capsys):
    lines = [b"Go.", b"", b"Hi. " * 200, b"caf\xe9 au lait", "I saw ☃.".encode(), b"Run!"]
    data = b"\n".join(lines)  # no newline after the last line: it still counts
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["translate", str(trained_run), "--beam", "3", "--batch-size", "4"]) == 1  # some failed
    captured = capsys.readouterr()
    out = captured.out.split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""  # every line ends with a line break
    assert out[0] and out[5] and out[1] == out[2] == out[3] == ""
    assert out[4]  # an unseen character is translated as unknown, with a warning
    errors = captured.err
    assert "line 2: empty line" in errors and "line 3: too long" in errors
    assert "line 4: not valid UTF-8 (byte 0xe9 at offset 3)" in errors and "line 5: unknown" in errors
    assert "Traceback" not in errors


def test_translate_files_and_n_best(trained_run, tmp_path, capsys):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("Go.\nWho?\n", encoding="utf-8")
    assert (
        main(
            [
                "translate",
                str(trained_run),
                "--input",
                str(source),
                "--output",
                str(target),
                "--beam",
                "4",
                "--n-best",
                "2",
            ]
        )
        == 0
    )
    rows = target.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and all(len(row.split(" ||| ")) == 2 for row in rows)


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["translate", str(tmp_path), "--beam", "2", "--n-best", "3"]) == 2  # a usage error
    assert "n_best" in capsys.readouterr().err


def test_translate_with_workers_writes_what_one_worker_writes(trained_run, tmp_path):
    source = tmp_path / "in.txt"
    # the empty lines are refused (exit 1: some lines failed), the same way with any number of workers
    source.write_text(
        "".join(f"{line}\n" for line in ("Go.", "Who?", "I see.", "", "Help me.", "Run!") * 3),
        encoding="utf-8",
    )
    outputs = []
    for workers in ("1", "3"):
        target = tmp_path / f"out.{workers}.txt"
        assert (
            main(
                [
                    "translate",
                    str(trained_run),
                    "--input",
                    str(source),
                    "--output",
                    str(target),
                    "--beam",
                    "3",
                    "--batch-size",
                    "2",
                    "--workers",
                    workers,
                    "--threads",
                    "1",
                ]
            )
            == 1
        )
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 18
    assert main(["translate", str(trained_run), "--workers", "0"]) == 2
