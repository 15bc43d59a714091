"""Signed, opaque state tokens: a session's recurrent state handed to the client.

Layout: ``MAGIC | version (1 byte) | header length (4 bytes, big-endian) | header JSON | zlib(arrays)
| HMAC-SHA256 tag (32 bytes)``; the tag covers every byte before it. The header names the model, the
bundle digest, the shapes of the arrays and how to continue (a pending token id, or the next-token
logits stored as the last array). Any replica holding the same key can resume the session exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"RNST"
VERSION = 1
_TAG = 32
KEY_ENV = "RNNLAB_STATE_KEY"


class TokenError(Exception):
    """A state token that cannot be used; ``reason`` is "malformed" or "signature"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SessionState:
    """What a session needs to continue exactly.

    state: arrays (L, 1, ...) float32; logits: (V,) float32 next-token logits, or None when ``pending``
    holds the last generated token, which the model has not read yet; tokens: tokens so far.
    """

    model: str
    bundle_digest: str
    state: list[np.ndarray]
    logits: np.ndarray | None
    pending: int | None
    tokens: int


def resolve_key(configured: str | None) -> bytes | None:
    """The configured key, else $RNNLAB_STATE_KEY, else None (the caller picks a random per-process key)."""
    key = configured or os.environ.get(KEY_ENV)
    return key.encode("utf-8") if key else None


def encode(snapshot: SessionState, key: bytes) -> bytes:
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in snapshot.state]
    if snapshot.logits is not None:
        arrays.append(np.ascontiguousarray(snapshot.logits, dtype=np.float32))
    header = {"model": snapshot.model, "bundle_digest": snapshot.bundle_digest,
              "shapes": [list(a.shape) for a in arrays], "has_logits": snapshot.logits is not None,
              "pending": snapshot.pending, "tokens": snapshot.tokens}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body = MAGIC + bytes([VERSION]) + len(head).to_bytes(4, "big") + head
    body += zlib.compress(b"".join(a.tobytes() for a in arrays), 1)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(token: bytes, key: bytes) -> SessionState:
    """Verifies the signature first, then parses; raises TokenError."""
    if len(token) < len(MAGIC) + 5 + _TAG or not token.startswith(MAGIC):
        raise TokenError("malformed", "not an rnnlab state token")
    body, tag = token[:-_TAG], token[-_TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise TokenError("signature",
                         "state token signature does not match (tampered, or signed with another key)")
    if body[len(MAGIC)] != VERSION:
        raise TokenError("malformed", f"state token version {body[len(MAGIC)]} is not supported")
    start = len(MAGIC) + 5
    end = start + int.from_bytes(body[len(MAGIC) + 1:start], "big")
    try:
        header = json.loads(body[start:end])
        raw = zlib.decompress(body[end:])
        arrays, offset = [], 0
        for shape in header["shapes"]:
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(raw, np.float32, count, offset).reshape(shape).copy())
            offset += 4 * count
        if offset != len(raw):
            raise ValueError("array bytes do not match the shapes")
        logits = arrays.pop() if header["has_logits"] else None
        return SessionState(header["model"], header["bundle_digest"], arrays, logits, header["pending"],
                            int(header["tokens"]))
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise TokenError("malformed", f"state token is malformed ({exc})") from exc
