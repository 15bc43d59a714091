"""The RNN LM: from-scratch cells equal the fused torch modules; initialisation options."""

from __future__ import annotations

import pytest
import torch

from lm.cells import GATES
from lm.model import RNNLM, ModelConfig


def twin_models(cell: str) -> tuple[RNNLM, RNNLM]:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, cell=cell, layers=2, embed=6, hidden=8, dropout=0.0)
    fused = RNNLM(config)
    scratch = RNNLM(ModelConfig(**{**config.to_dict(), "impl": "scratch"}))
    scratch.load_state_dict(fused.state_dict())
    return fused, scratch


@pytest.mark.parametrize("cell", tuple(GATES))
def test_scratch_cells_equal_fused_modules_forward_state_and_gradients(cell: str) -> None:
    fused, scratch = twin_models(cell)
    tokens = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    state = tuple(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2 + i))
                  for i in range(len(fused.config.state_names)))
    outputs = []
    for model in (fused, scratch):
        logits, new_state = model(tokens, state)
        loss = logits.square().mean() + sum(s.square().mean() for s in new_state)
        loss.backward()
        outputs.append((logits, new_state, {n: p.grad for n, p in model.named_parameters()}))
    (logits_f, state_f, grads_f), (logits_s, state_s, grads_s) = outputs
    torch.testing.assert_close(logits_s, logits_f, atol=1e-5, rtol=0)
    assert len(state_s) == len(state_f) == (2 if cell == "lstm" else 1)
    for s, f in zip(state_s, state_f, strict=True):
        torch.testing.assert_close(s, f, atol=1e-5, rtol=0)
    assert grads_f.keys() == grads_s.keys()
    for name, grad in grads_f.items():
        torch.testing.assert_close(grads_s[name], grad, atol=1e-5, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_f.values())


def test_lstm_forget_bias_is_one_by_default_and_switchable() -> None:
    hidden = 8
    for forget_bias, expected in ((1.0, 1.0), (0.0, None)):
        model = RNNLM(ModelConfig(vocab_size=5, cell="lstm", layers=2, embed=4, hidden=hidden,
                                  forget_bias=forget_bias))
        for k in range(2):
            biases = getattr(model.rnn, f"bias_ih_l{k}") + getattr(model.rnn, f"bias_hh_l{k}")
            total = biases[hidden:2 * hidden]  # gates i|f|g|o
            if expected is None:
                assert not torch.allclose(total, torch.ones(hidden))  # torch's uniform init
            else:
                torch.testing.assert_close(total, torch.full((hidden,), expected))


@pytest.mark.parametrize("cell", tuple(GATES))
def test_recurrent_weights_are_orthogonal_blocks_unless_switched_off(cell: str) -> None:
    eye = torch.eye(8)
    on = RNNLM(ModelConfig(vocab_size=5, cell=cell, layers=1, embed=4, hidden=8))
    off = RNNLM(ModelConfig(vocab_size=5, cell=cell, layers=1, embed=4, hidden=8, orthogonal=False))
    for block in on.rnn.weight_hh_l0.detach().chunk(GATES[cell]):
        torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0)
    assert not torch.allclose(off.rnn.weight_hh_l0[:8] @ off.rnn.weight_hh_l0[:8].T, eye, atol=1e-2)


def test_tied_head_shares_the_embedding_and_needs_equal_sizes() -> None:
    model = RNNLM(ModelConfig(vocab_size=7, embed=8, hidden=8, tie=True))
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ValueError, match="--tie needs embed == hidden"):
        ModelConfig(vocab_size=7, embed=4, hidden=8, tie=True)


def test_state_is_carried_between_calls() -> None:
    """Two calls with the state handed over equal one call over the concatenation."""
    model = RNNLM(ModelConfig(vocab_size=9, cell="lstm", layers=2, embed=4, hidden=8)).eval()
    tokens = torch.randint(0, 9, (2, 10))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :4])
    second, _ = model(tokens[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
