"""Generation: greedy is deterministic, a seed fixes sampling, stop strings, torch == onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.cli import main
from lm.generate import generate, generate_ids
from lm.run import load_run
from serving.sampling import SamplingParams

PROMPT = "The Time Traveller "


def text(run, prompt=PROMPT, n=40, stop=(), **params) -> str:
    return "".join(generate(run.model, run.tokenizer, prompt, n, SamplingParams(**params), stop))


def test_greedy_is_deterministic_and_takes_the_argmax(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    greedy = text(run, temperature=0)
    assert greedy == text(run, temperature=0) and len(greedy) == 40
    ids = run.tokenizer.encode(PROMPT)
    with torch.no_grad():  # the prompt warms up the state, then one token at a time
        logits, state = run.model(torch.tensor([ids]))
        manual = []
        for _ in range(40):
            manual.append(int(logits[0, -1].argmax()))
            logits, state = run.model(torch.tensor([manual[-1:]]), state)
    assert greedy == run.tokenizer.decode(manual)


def test_a_seed_fixes_the_sampled_text(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    a = text(run, temperature=1.0, top_k=10, top_p=0.95, seed=7)
    assert a == text(run, temperature=1.0, top_k=10, top_p=0.95, seed=7)
    assert a != text(run, temperature=1.0, top_k=10, top_p=0.95, seed=8)
    assert a != text(run, temperature=0)


def test_stop_strings_end_the_text_before_them(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    greedy = text(run, temperature=0)
    stop = greedy[12:15]
    cut = greedy.index(stop)
    assert text(run, temperature=0, stop=(stop, "never-there")) == greedy[:cut]


def test_bad_prompt_and_budget(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    with pytest.raises(ValueError, match="empty"):
        list(generate_ids(run.model, [], 5, SamplingParams()))
    assert text(run, n=0) == ""


def test_generate_command_gives_the_same_text_from_the_run_and_its_onnx_bundle(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    argv = ["--prompt", PROMPT, "--max-tokens", "60", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    assert main(["generate", str(tiny_run), *argv]) == 0
    torch_out = capsys.readouterr()
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "bundle")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "bundle"), *argv]) == 0
    ort_out = capsys.readouterr()
    assert torch_out.out == ort_out.out and len(torch_out.out) == 61
    assert "torch" in torch_out.err and "onnxruntime" in ort_out.err
