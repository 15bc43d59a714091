"""State tokens: exact round trip, and refusal of anything not signed with the key."""

from __future__ import annotations

import numpy as np
import pytest

from serving.state_token import SessionState, TokenError, decode, encode

KEY = b"k" * 32


def snapshot(logits: bool) -> SessionState:
    rng = np.random.default_rng(0)
    state = [rng.standard_normal((2, 1, 16)).astype(np.float32) for _ in range(2)]
    return SessionState(
        "m",
        "ab" * 32,
        state,
        rng.standard_normal(40).astype(np.float32) if logits else None,
        None if logits else 7,
        123,
    )


@pytest.mark.parametrize("with_logits", [True, False])
def test_round_trip_is_exact(with_logits):
    original = snapshot(with_logits)
    back = decode(encode(original, KEY), KEY)
    assert (back.model, back.bundle_digest) == ("m", "ab" * 32)
    assert (back.pending, back.tokens) == (original.pending, 123)
    for a, b in zip(back.state, original.state, strict=True):
        np.testing.assert_array_equal(a, b)
    if with_logits:
        np.testing.assert_array_equal(back.logits, original.logits)
    else:
        assert back.logits is None


def test_every_flipped_byte_is_refused():
    token = encode(snapshot(True), KEY)
    for i in range(0, len(token), 7):
        bad = bytearray(token)
        bad[i] ^= 0x40
        with pytest.raises(TokenError):
            decode(bytes(bad), KEY)


def test_other_key_and_garbage_are_refused_with_their_reason():
    token = encode(snapshot(False), KEY)
    with pytest.raises(TokenError) as info:
        decode(token, b"other")
    assert info.value.reason == "signature"
    with pytest.raises(TokenError) as info:
        decode(b"hello", KEY)
    assert info.value.reason == "malformed"
    with pytest.raises(TokenError):
        decode(token[:-1], KEY)
