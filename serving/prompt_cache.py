"""Prompt states by prompt: a stream whose prompt was read before starts decoding at once.

A recurrent model's whole context is its state, (L, 1, ...) per state tensor, and the next-token logits
(V,): a few KB per prompt however long the prompt is. Remembering them is cheap, and clients that share
a prompt (a system prompt, a template, the demo's prompt) skip the prefill after the first one. Only
prompts read from the initial state are cached: a session's append depends on the session's state.

Entries are read-only arrays, shared by every stream that starts from them (the engine never writes a
state in place: batching concatenates, retiring copies). Used by one model's step thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_Entry = tuple[list[np.ndarray], np.ndarray, int]  # state, logits, bytes (key included)


class PromptCache:
    """Least recently used prompt states, bounded by count and bytes; ``max_entries`` 0 turns it off."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 * 2**20) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"prompt cache bounds must be >= 0, not {max_entries} entries / {max_bytes} B")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(ids: Sequence[int]) -> bytes:
        return np.asarray(ids, dtype=np.int64).tobytes()

    def get(self, ids: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray] | None:
        """The state (read-only (L, 1, ...) arrays) and last logits (V,) after reading ``ids``, if cached."""
        if not self.max_entries:
            return None
        entry = self._entries.get(key := self._key(ids))
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0], entry[1]

    def put(self, ids: Sequence[int], state: Sequence[np.ndarray], logits: np.ndarray) -> None:
        """Remembers read-only copies of ``state`` ((L, 1, ...) arrays) and ``logits`` (V,) for ``ids``."""
        if not self.max_entries:
            return
        key = self._key(ids)
        frozen = [_frozen(a) for a in state]
        last = _frozen(logits)
        size = len(key) + sum(a.nbytes for a in frozen) + last.nbytes
        if size > self.max_bytes:
            return
        if (old := self._entries.pop(key, None)) is not None:
            self.bytes -= old[2]
        self._entries[key] = (frozen, last, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
