"""int8 vs fp32 bundles: file size, decode-step time and perplexity.

Trains a char model briefly on timemachine (or loads a run directory), exports it both ways, and
measures in the same process: graph sizes, one decode step at batch 1 and 64 (fp32 and int8 calls
interleaved, and each back-to-back; one thread, median of many reps) and test-split perplexity through
the runtime, over whole chunks (prefill graph) and token by token (decode graph).
Writes bench/results/export_int8.json.

    python -m bench.export_int8 [--cells gru,lstm] [--train-seconds 60] [--run-dir RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bench import repo_path
from bench.export_step import alone, interleaved
from lm.corpus import load_split
from lm.export import export_lm
from lm.model import RNNLM, ModelConfig
from serving.runtime import LMRuntime
from serving.tokenizers import CharTokenizer, Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "export_int8.json"


def train_briefly(cell: str, text: str, seconds: float, hidden: int = 256, layers: int = 2,
                  ) -> tuple[RNNLM, Tokenizer, dict]:
    """Adam on random 64-char windows (batch 32) for ``seconds`` of wall time."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, cell=cell, layers=layers, embed=hidden,
                              hidden=hidden, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    window, batch, steps, start = 64, 32, 0, time.monotonic()
    while time.monotonic() - start < seconds:
        rows = torch.randint(0, len(ids) - window - 1, (batch,))[:, None] + torch.arange(window + 1)
        logits, _ = model(ids[rows[:, :-1]])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[rows[:, 1:]].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    info = {"train_steps": steps, "train_seconds": round(time.monotonic() - start, 1),
            "final_train_loss": round(loss.item(), 4), "batch": batch, "window": window}
    return model.eval(), tokenizer, info


def step_times(model: RNNLM, a: LMRuntime, b: LMRuntime, batch: int, reps: int) -> dict[str, float]:
    """fp32 vs int8 bundle interleaved; then int8 vs eager torch (fp32) interleaved."""
    tokens = np.random.default_rng(0).integers(0, a.vocab_size, (batch, 1), dtype=np.int64)
    state = a.init_state(batch)
    t_tokens, t_state = torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state)

    def torch_step() -> None:
        with torch.inference_mode():
            model(t_tokens, t_state)

    int8_step = ("int8", lambda: b.step(tokens, state))
    medians = interleaved(("fp32", lambda: a.step(tokens, state)), int8_step, reps)
    vs_torch = interleaved(int8_step, ("torch", torch_step), reps)
    warm = {"fp32": alone(lambda: a.step(tokens, state), reps), "int8": alone(int8_step[1], reps),
            "torch": alone(torch_step, reps)}
    return {"batch": batch, "fp32_us": round(medians["fp32"], 1), "int8_us": round(medians["int8"], 1),
            "ratio_int8_to_fp32": round(medians["int8"] / medians["fp32"], 3),
            "torch_eager_us": round(vs_torch["torch"], 1),
            "ratio_int8_to_torch": round(vs_torch["int8"] / vs_torch["torch"], 3),
            "alone_us": {k: round(v, 1) for k, v in warm.items()},
            "alone_ratio_int8_to_fp32": round(warm["int8"] / warm["fp32"], 3),
            "alone_ratio_int8_to_torch": round(warm["int8"] / warm["torch"], 3)}


def compare(model: RNNLM, tokenizer: Tokenizer, test_text: str, reps: int, tmp: Path) -> dict:
    fp32 = LMRuntime.load(export_lm(model, tokenizer, tmp / "fp32"))
    int8 = LMRuntime.load(export_lm(model, tokenizer, tmp / "int8", quantize="int8"))
    size = {name: sum((tmp / name / f).stat().st_size for f in rt.manifest.graphs.values())
            for name, rt in (("fp32", fp32), ("int8", int8))}
    ppl = {name: rt.perplexity(test_text)["perplexity"] for name, rt in (("fp32", fp32), ("int8", int8))}
    # Token by token (T = 1): through the int8 decode graph when the bundle has one.
    ppl["int8_stepwise"] = int8.perplexity(test_text, chunk=1)["perplexity"]
    quant = int8.manifest.data["quantization"]
    return {
        "model": {"cell": model.config.cell, "layers": model.config.layers, "hidden": model.config.hidden,
                  "vocab": model.config.vocab_size},
        "bytes": {**size, "ratio_int8_to_fp32": round(size["int8"] / size["fp32"], 3)},
        "test_perplexity": {k: round(v, 4) for k, v in ppl.items()}
        | {"relative_change": round(ppl["int8"] / ppl["fp32"] - 1, 5),
           "relative_change_stepwise": round(ppl["int8_stepwise"] / ppl["fp32"] - 1, 5)},
        "max_abs_logit_diff_vs_torch": {role: quant[role]["vs_torch_max_abs_logits"]
                                        for role in ("step", "decode") if role in quant},
        "step": [step_times(model, fp32, int8, 1, reps),
                 step_times(model, fp32, int8, 64, max(50, reps // 8))],
        "int8_graphs": {role: sorted({node.op_type for node in _graph_nodes(tmp / "int8" / file)})
                        for role, file in int8.manifest.graphs.items()},
    }


def _graph_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="gru,lstm", help="comma-separated cells to train and compare")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="training time per cell")
    parser.add_argument("--run-dir", type=Path, default=None, help="use this trained run instead of training")
    parser.add_argument("--corpus", default="timemachine")
    parser.add_argument("--reps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test_text = load_split(args.corpus, "test")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir is not None:
            from lm.run import load_run

            run = load_run(args.run_dir)
            results.append({"source": repo_path(args.run_dir), **compare(run.model, run.tokenizer, test_text,
                                                                   args.reps, Path(tmp) / "run")})
        else:
            train_text = load_split(args.corpus, "train")
            for cell in args.cells.split(","):
                model, tokenizer, info = train_briefly(cell, train_text, args.train_seconds)
                results.append({"source": f"trained here on {args.corpus}", "training": info,
                                **compare(model, tokenizer, test_text, args.reps, Path(tmp) / cell)})
    document = {"corpus": args.corpus, "test_chars": len(test_text), "threads": 1,
                "load_average_1min_at_end": round(os.getloadavg()[0], 2), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
