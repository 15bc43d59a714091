"""Token-by-token decoding with the recurrent state kept in onnxruntime-bound buffers.

A decode loop hands each step's state straight to the next step, so the state need not cross Python at
all. ``StatefulDecoder`` allocates the T = 1 graph's tensors once: a (B, 1) token buffer, the logits, and
two copies of every state tensor, bound (``IOBinding``) as the state input of one binding and the state
output of the other. Steps alternate between the two bindings (ping-pong), so a step is: check and write
the ids, run, flip. That skips what ``LMRuntime.step`` does per call (checking and converting the state,
allocating the outputs): ~5 µs of a ~45 µs batch-1 step on the reference machine (bench/export_step.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from serving.runtime import LMRuntime


class StatefulDecoder:
    """Decodes ``batch`` streams of one bundle from ``state`` (default: zeros). One decode loop owns it:
    it is not thread-safe, and ``step`` returns a view of the logits buffer that the next step overwrites.
    """

    def __init__(self, runtime: LMRuntime, state: Sequence[np.ndarray] | None = None, batch: int = 1) -> None:
        if state is None:
            if batch < 1:
                raise ValueError(f"batch must be >= 1, got {batch}")
            state = runtime.init_state(batch)
        else:
            batch = _batch_of(state)
            runtime.validate(np.zeros((batch, 1), dtype=np.int64), state)
        self.batch, self.vocab_size = batch, runtime.vocab_size
        self._check_ids = runtime.check_ids
        self._tokens = np.zeros((batch, 1), dtype=np.int64)
        self._logits = np.empty((batch, 1, runtime.vocab_size), dtype=np.float32)
        self._buffers = [[np.array(value, order="C") for value in state], runtime.init_state(batch)]
        self._session = runtime.token_session
        names = list(zip(runtime.state_names, runtime.state_output_names, strict=True))
        self._bindings = [self._bind(names, self._buffers[i], self._buffers[1 - i]) for i in (0, 1)]
        self._current = 0  # the buffer that holds the state now

    def _bind(self, names: list[tuple[str, str]], state_in: list[np.ndarray], state_out: list[np.ndarray],
              ) -> ort.IOBinding:
        binding = self._session.io_binding()
        _bind_array(binding.bind_input, "tokens", self._tokens)
        _bind_array(binding.bind_output, "logits", self._logits)
        for (name, out_name), src, dst in zip(names, state_in, state_out, strict=True):
            _bind_array(binding.bind_input, name, src)
            _bind_array(binding.bind_output, out_name, dst)
        return binding

    @property
    def state(self) -> list[np.ndarray]:
        """A copy of the current state: one float32 array (L, B, ...) per state tensor."""
        return [buffer.copy() for buffer in self._buffers[self._current]]

    def step(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """tokens: B ids (a list of ints or a (B,) integer array) -> logits (B, V) float32."""
        if self.batch == 1 and type(tokens) is list and len(tokens) == 1 and type(tokens[0]) is int:
            if not 0 <= tokens[0] < self.vocab_size:  # the single-stream loop's case, in few operations
                self._check_ids(np.asarray(tokens))
        else:
            tokens = np.asarray(tokens)
            if tokens.shape != (self.batch,) or tokens.dtype.kind not in "iu":
                raise ValueError(f"tokens: expected {self.batch} integer ids (one per stream), got "
                                 f"{tokens.dtype} {tokens.shape}")
            self._check_ids(tokens)
        self._tokens[:, 0] = tokens
        self._session.run_with_iobinding(self._bindings[self._current])
        self._current ^= 1
        return self._logits[:, 0]


def _batch_of(state: Sequence[np.ndarray]) -> int:
    """The batch axis of a state list; anything malformed is left for LMRuntime.validate to name."""
    first = state[0] if len(state) else None
    return first.shape[1] if isinstance(first, np.ndarray) and first.ndim >= 2 else 1


def _bind_array(bind: Callable[..., None], name: str, array: np.ndarray) -> None:
    """Binds the memory of ``array`` (which the decoder keeps alive) to the graph tensor ``name``."""
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
