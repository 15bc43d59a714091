import pytest
import torch

from seq2seq.loss import masked_cross_entropy
from seq2seq.model import Seq2Seq, Seq2SeqConfig

VARIANTS = [
    dict(attention="additive", bidirectional=True, layers=2),
    dict(attention="none", bidirectional=True, layers=1),
    dict(attention="additive", bidirectional=False, layers=1, enc_hidden=24),
]


def make_model(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    values = dict(src_vocab=40, tgt_vocab=50, embed=16, enc_hidden=16, dec_hidden=24, attn_dim=8, dropout=0.3)
    values.update(overrides)
    return Seq2Seq(Seq2SeqConfig(**values)).eval()


def padded_batch():
    """Three sources of lengths 7, 3, 5 (pad 0 after the end) and random targets."""
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (3, 7), generator=generator)
    lengths = torch.tensor([7, 3, 5])
    src[1, 3:] = 0
    src[2, 5:] = 0
    tgt = torch.randint(4, 50, (3, 6), generator=generator)
    return src, lengths, tgt


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_by_step_decoding_equals_teacher_forced_forward(variant):
    model = make_model(**variant)
    src, lengths, tgt = padded_batch()
    with torch.no_grad():
        forced = model(src, lengths, tgt)
        enc_out, mask, state = model.encode(src, lengths)
        stepped = []
        for t in range(tgt.shape[1]):
            logits, state = model.decode_step(tgt[:, t], state, enc_out, mask)
            stepped.append(logits)
    assert enc_out.shape[:2] == mask.shape and state.shape == (variant["layers"], 3, 24)
    torch.testing.assert_close(torch.stack(stepped, 1), forced, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_source_positions_do_not_change_the_output(variant):
    model = make_model(**variant)
    src, lengths, tgt = padded_batch()
    other = src.clone()
    other[1, 3:] = torch.tensor([9, 8, 7, 6])  # garbage where the padding was
    other[2, 5:] = 5
    wider = torch.cat([src, torch.zeros(3, 4, dtype=torch.int64)], dim=1)  # more padding
    with torch.no_grad():
        reference = model(src, lengths, tgt)
        torch.testing.assert_close(model(other, lengths, tgt), reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(wider, lengths, tgt), reference, rtol=0, atol=1e-6)
        # and a sentence alone gives what it gives inside the padded batch
        alone = model(src[1:2, :3], lengths[1:2], tgt[1:2])
        torch.testing.assert_close(alone, reference[1:2], rtol=0, atol=1e-5)


def test_attention_gives_padded_positions_no_weight():
    model = make_model()
    src, lengths, _ = padded_batch()
    with torch.no_grad():
        enc_out, mask, state = model.encode(src, lengths)
        keys = enc_out[:, :, model.config.memory_features :]
        weights = model.attention.weights(state[-1], keys, mask)
    assert mask.tolist()[1] == [True] * 3 + [False] * 4
    assert torch.all(weights[~mask] == 0) and torch.allclose(weights.sum(1), torch.ones(3))


def test_masked_loss_ignores_pad_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[4, 5, 6, 0, 0], [7, 8, 9, 10, 3]])
    changed = logits.clone()
    changed[0, 3:] = torch.randn(2, 11) * 100  # what the model says at pad positions must not matter
    for smoothing in (0.0, 0.1):
        loss, tokens = masked_cross_entropy(logits, targets, pad_id=0, label_smoothing=smoothing)
        assert tokens == 8
        assert torch.equal(loss, masked_cross_entropy(changed, targets, 0, smoothing)[0])
        full = masked_cross_entropy(logits[:, :3], targets[:, :3], 0, smoothing)[0] * 6
        rest = masked_cross_entropy(logits[1:, 3:], targets[1:, 3:], 0, smoothing)[0] * 2
        torch.testing.assert_close(loss, (full + rest) / 8)


def test_tied_embeddings_share_one_tensor():
    model = make_model(embed=16, tie=True)
    assert model.out.weight is model.tgt_embed.weight
    untied = make_model(tie=False)
    assert untied.out.weight is not untied.tgt_embed.weight
