"""Checkpoint files: atomic writes (serving.files); loads refuse corrupt, truncated, foreign or unsafe files.

A checkpoint is a ``torch.save`` file holding a small envelope::

    {"format": "rnnlab-checkpoint", "version": 1, "kind": "lm"|"mt",
     "sha256": hex digest of the body, "body": (N,) uint8 tensor}

where the body is the ``torch.save`` bytes of the payload dict. The digest is there because torch's own
zip reader does not notice flipped bytes inside a tensor record; the envelope keeps format, version and
kind readable without trusting the body. Both layers load with ``weights_only=True``, so payloads may
hold tensors, dicts, lists, tuples, str, int, float, bool and None only (optimizer state dicts,
``lm.rng.capture_rng_state()`` and model state dicts qualify); loading never runs code from the file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from serving.errors import UserError
from serving.files import atomic_write_bytes

FORMAT = "rnnlab-checkpoint"
VERSION = 1
KINDS = ("lm", "mt", "ts")


class CheckpointError(UserError):
    """A checkpoint cannot be read or written; the message is one line naming the file."""


_PLAIN_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _check_plain(obj: Any, where: str, path: str | Path) -> None:
    """Refuses at save time what ``weights_only`` loading would refuse later (numpy values, objects).

    Exact type checks, because numpy scalars subclass float and int but do not load.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES:
        return
    if type(obj) not in _PLAIN_CONTAINERS:
        kind = f"{type(obj).__module__}.{type(obj).__name__}"
        raise CheckpointError(
            f"{path}: cannot save {where} of type {kind}; checkpoints hold only tensors and plain Python data"
        )
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(obj, dict):
            _check_plain(key, f"a key of {where}", path)
        _check_plain(value, f"{where}[{key!r}]", path)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` (which must carry ``"kind"``) atomically; ``format``/``version`` are set here."""
    kind = payload.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: payload kind must be one of {', '.join(KINDS)}, not {kind!r}")
    _check_plain(payload, "payload", path)
    body = _to_bytes({**payload, "format": FORMAT, "version": VERSION})
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "sha256": hashlib.sha256(body).hexdigest(),
        "body": torch.frombuffer(bytearray(body), dtype=torch.uint8),
    }
    try:
        atomic_write_bytes(path, _to_bytes(envelope))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from exc


def _safe_load(source: str | Path | io.BytesIO, path: str | Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from exc
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything beyond plain data: a foreign or hostile pickle
        raise CheckpointError(f"{path}: not an rnnlab checkpoint (holds objects beyond plain data)") from exc
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as exc:
        # torch reports a plain (non-zip) pickle as a bare KeyError of a pickle opcode
        reason = "unrecognised layout" if isinstance(exc, KeyError) else (str(exc).splitlines() or ["?"])[0]
        raise CheckpointError(f"{path}: corrupt, truncated or not a checkpoint ({reason})") from exc


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` and returns its payload dict.

    Raises CheckpointError naming the file when it is missing, corrupt, truncated, foreign,
    of another kind, or of an unsupported version.
    """
    envelope = _safe_load(path, path)
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rnnlab checkpoint (no {FORMAT!r} format marker)")
    version = envelope.get("version")
    if version != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {version!r} (reads {VERSION})")
    if envelope.get("kind") != kind:
        raise CheckpointError(f"{path}: is a {envelope.get('kind')!r} checkpoint, expected {kind!r}")
    body = envelope.get("body")
    if not isinstance(body, torch.Tensor) or body.dtype != torch.uint8:
        raise CheckpointError(f"{path}: corrupt checkpoint (missing body)")
    data = body.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"{path}: corrupt checkpoint (sha256 of the contents does not match)")
    payload = _safe_load(io.BytesIO(data), path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint (payload is not a dict)")
    return payload
