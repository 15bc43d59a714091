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
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np

from serving.errors import UserError

MAGIC = b"RNST"
VERSION = 1
_TAG = 32
KEY_ENV = "RNNLAB_STATE_KEY"
# A key file shorter than this is refused: a truncated or empty file (a secret not mounted yet) would
# otherwise sign every replica's tokens with a guessable key. 16 bytes = 128 bits.
MIN_KEY_FILE_BYTES = 16


class StateKeyError(UserError):
    """A state key file that is missing, unreadable or too short; the message names the file."""


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


def read_key_file(path: str | os.PathLike) -> bytes:
    """The key held in ``path``: its bytes without surrounding whitespace (``echo`` and ``openssl rand
    -hex`` end the file with a newline), at least ``MIN_KEY_FILE_BYTES`` of them; raises StateKeyError."""
    try:
        with open(path, "rb") as file:
            key = file.read(1 << 16).strip()
    except OSError as exc:
        raise StateKeyError(f"cannot read state key file {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_FILE_BYTES:
        raise StateKeyError(
            f"state key file {path} holds {len(key)} bytes; at least {MIN_KEY_FILE_BYTES} are needed "
            "(e.g. `openssl rand -hex 32 > FILE`)"
        )
    return key


def resolve_key(configured: str | None, key_file: str | os.PathLike | None = None) -> bytes | None:
    """The configured key, else the key file's, else $RNNLAB_STATE_KEY, else None (the caller picks a
    random per-process key). Replicas that resume each other's tokens must resolve the same key."""
    if configured:
        return configured.encode("utf-8")
    if key_file:
        return read_key_file(key_file)
    key = os.environ.get(KEY_ENV)
    return key.encode("utf-8") if key else None


def encode(snapshot: SessionState, key: bytes) -> bytes:
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in snapshot.state]
    if snapshot.logits is not None:
        arrays.append(np.ascontiguousarray(snapshot.logits, dtype=np.float32))
    header = {
        "model": snapshot.model,
        "bundle_digest": snapshot.bundle_digest,
        "shapes": [list(a.shape) for a in arrays],
        "has_logits": snapshot.logits is not None,
        "pending": snapshot.pending,
        "tokens": snapshot.tokens,
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body = MAGIC + bytes([VERSION]) + len(head).to_bytes(4, "big") + head
    body += zlib.compress(b"".join(a.tobytes() for a in arrays), 1)
    return body + hmac.new(key, body, hashlib.sha256).digest()


MAX_TOKENS = 2**53  # a session's token count; JSON-exact, far inside the response's int64
MAX_STATE_VALUES = 1 << 24  # float32 values (64 MB): the decompressed size is bounded before inflating


def decode(token: bytes, key: bytes, max_values: int = MAX_STATE_VALUES) -> SessionState:
    """Verifies the signature first, then parses and checks every header field's type and range;
    raises TokenError. Ids against the vocabulary and shapes against the model are the caller's checks."""
    if len(token) < len(MAGIC) + 5 + _TAG or not token.startswith(MAGIC):
        raise TokenError("malformed", "not an rnnlab state token")
    body, tag = token[:-_TAG], token[-_TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise TokenError(
            "signature", "state token signature does not match (tampered, or signed with another key)"
        )
    if body[len(MAGIC)] != VERSION:
        raise TokenError("malformed", f"state token version {body[len(MAGIC)]} is not supported")
    start = len(MAGIC) + 5
    end = start + int.from_bytes(body[len(MAGIC) + 1 : start], "big")
    try:
        header = _header(json.loads(body[start:end]), max_values)
        counts = [math.prod(shape) for shape in header["shapes"]]
        raw = _inflate(body[end:], 4 * sum(counts))
        arrays, offset = [], 0
        for shape, count in zip(header["shapes"], counts, strict=True):
            arrays.append(np.frombuffer(raw, np.float32, count, offset).reshape(shape).copy())
            offset += 4 * count
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError("arrays hold NaN or infinity")
        logits = arrays.pop() if header["has_logits"] else None
        return SessionState(
            header["model"], header["bundle_digest"], arrays, logits, header["pending"], header["tokens"]
        )
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise TokenError("malformed", f"state token is malformed ({str(exc)[:120]})") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header(header: object, max_values: int) -> dict:
    """The header with every field checked for type and range; ValueError names the first bad one."""
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    if not isinstance(header.get("model"), str) or not isinstance(header.get("bundle_digest"), str):
        raise ValueError("model and bundle_digest must be strings")
    shapes = header.get("shapes")
    if not (
        isinstance(shapes, list)
        and 0 < len(shapes) <= 64
        and all(
            isinstance(s, list) and len(s) <= 6 and all(_is_int(d) and 0 <= d <= max_values for d in s)
            for s in shapes
        )
    ):
        raise ValueError("shapes must be 1..64 lists of at most 6 non-negative integers")
    if sum(math.prod(s) for s in shapes) > max_values:
        raise ValueError(f"arrays hold more than {max_values} values")
    if not isinstance(header.get("has_logits"), bool):
        raise ValueError("has_logits must be a boolean")
    pending = header.get("pending")
    if pending is not None and not (_is_int(pending) and 0 <= pending < 2**31):
        raise ValueError("pending must be null or a token id in [0, 2**31)")
    if not (_is_int(header.get("tokens")) and 0 <= header["tokens"] <= MAX_TOKENS):
        raise ValueError(f"tokens must be an integer in [0, {MAX_TOKENS}]")
    return header


def _inflate(data: bytes, size: int) -> bytes:
    """zlib-inflates at most ``size`` bytes; ValueError unless the stream holds exactly that many."""
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data, size + 1)
    if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("array bytes do not match the shapes")
    return raw
