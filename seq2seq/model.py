"""The GRU encoder-decoder: bidirectional (or not) GRU encoder, GRU decoder, classic or additive attention.

Two methods are the whole inference interface (what ``encoder.onnx`` and ``decoder_step.onnx`` export):

- ``encode(src (B,S) int64, src_len (B,) int64) -> (enc_out (B,M,E'), mask (B,M) bool, state (L,B,H))``
- ``decode_step(prev (B,) int64, state (L,B,H), enc_out, mask) -> (logits (B,V), state (L,B,H))``

``enc_out`` is the decoder's *memory*. With attention it holds, for every source position (M = S),
the encoder output (C features) and its projected attention key (A features) side by side, so the
keys are computed once per sentence rather than once per step: E' = C + A. The classic variant's
memory is one slot (M = 1): the encoder's final state (E' = C), read at every step. Padded source
positions are masked out of the attention, and the encoder packs sequences so that a sentence's
encoding does not depend on how much padding its batch has.

``forward`` (teacher forcing) runs the same step computation over a whole target; only the final
read-out is batched over time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import Seq2SeqConfig


class AdditiveAttention(nn.Module):
    """Bahdanau scoring: score_j = v · tanh(W_q q + W_k m_j); softmax over unmasked positions."""

    def __init__(self, query: int, memory: int, dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory, dim, bias=False)
        self.query = nn.Linear(query, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def weights(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B,H), keys (B,S,A), mask (B,S) bool -> weights (B,S), exactly 0 where mask is False."""
        scores = self.score(torch.tanh(keys + self.query(query).unsqueeze(1))).squeeze(2)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """query (B,H), keys (B,S,A), memory (B,S,C), mask (B,S) bool -> context (B,C)."""
        return torch.bmm(self.weights(query, keys, mask).unsqueeze(1), memory).squeeze(1)


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        between = c.dropout if c.layers > 1 else 0.0
        self.src_embed = nn.Embedding(c.src_vocab, c.embed, padding_idx=c.pad_id)
        self.encoder = nn.GRU(
            c.embed, c.enc_hidden, c.layers, batch_first=True, bidirectional=c.bidirectional, dropout=between
        )
        needs_bridge = c.bidirectional or c.enc_hidden != c.dec_hidden
        self.bridge = nn.Linear(c.memory_features, c.dec_hidden) if needs_bridge else None
        self.attention = (
            AdditiveAttention(c.dec_hidden, c.memory_features, c.attn_dim)
            if c.attention == "additive"
            else None
        )
        self.tgt_embed = nn.Embedding(c.tgt_vocab, c.embed, padding_idx=c.pad_id)
        self.decoder = nn.GRU(
            c.embed + c.memory_features, c.dec_hidden, c.layers, batch_first=True, dropout=between
        )
        self.readout = nn.Linear(c.dec_hidden + c.memory_features + c.embed, c.embed)
        self.out = nn.Linear(c.embed, c.tgt_vocab)
        if c.tie:
            self.out.weight = self.tgt_embed.weight
        self.drop = nn.Dropout(c.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small embeddings: with tying they are also the output layer, and N(0, 1) logits start too peaked.
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.uniform_(emb.weight, -0.1, 0.1)
            with torch.no_grad():
                emb.weight[self.config.pad_id].zero_()
        nn.init.zeros_(self.out.bias)

    # --- encoder -------------------------------------------------------------------------------------
    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """src (B,S) int64, src_len (B,) int64 >= 1 -> enc_out (B,M,E'), mask (B,M) bool, state (L,B,H)."""
        c = self.config
        batch, length = src.shape
        packed = pack_padded_sequence(
            self.drop(self.src_embed(src)), src_len.cpu(), batch_first=True, enforce_sorted=False
        )
        outputs, h_n = self.encoder(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=length)
        dirs = 2 if c.bidirectional else 1
        # h_n (L*dirs, B, H) -> (L, B, dirs*H): each layer's forward and backward final states side by side.
        final = (
            h_n.view(c.layers, dirs, batch, c.enc_hidden)
            .permute(0, 2, 1, 3)
            .reshape(c.layers, batch, c.memory_features)
        )
        state = torch.tanh(self.bridge(final)) if self.bridge is not None else final
        if self.attention is None:
            return final[-1].unsqueeze(1), torch.ones(batch, 1, dtype=torch.bool), state.contiguous()
        mask = torch.arange(length).unsqueeze(0) < src_len.unsqueeze(1)
        enc_out = torch.cat([outputs, self.attention.key(outputs)], dim=2)
        return enc_out, mask, state.contiguous()

    # --- decoder -------------------------------------------------------------------------------------
    def _split(self, enc_out: Tensor) -> tuple[Tensor, Tensor | None]:
        """enc_out (B,M,E') -> memory (B,M,C), attention keys (B,M,A) or None."""
        memory_features = self.config.memory_features
        if self.attention is None:
            return enc_out, None
        return enc_out[:, :, :memory_features], enc_out[:, :, memory_features:]

    def _context(self, query: Tensor, memory: Tensor, keys: Tensor | None, mask: Tensor) -> Tensor:
        """query (B,H) -> context (B,C)."""
        if self.attention is None or keys is None:
            return memory[:, 0]
        return self.attention(query, keys, memory, mask)

    def _step(
        self, embedded: Tensor, state: Tensor, memory: Tensor, keys: Tensor | None, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """embedded (B,E) -> decoder output (B,H), context (B,C), state (L,B,H)."""
        context = self._context(state[-1], memory, keys, mask)
        output, state = self.decoder(torch.cat([embedded, context], dim=1).unsqueeze(1), state)
        return output[:, 0], context, state

    def _readout(self, output: Tensor, context: Tensor, embedded: Tensor) -> Tensor:
        """(..., H), (..., C), (..., E) -> logits (..., V)."""
        hidden = torch.tanh(self.readout(torch.cat([output, context, embedded], dim=-1)))
        return self.out(self.drop(hidden))

    def decode_step(
        self, prev: Tensor, state: Tensor, enc_out: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """prev (B,) int64, state (L,B,H), enc_out (B,M,E'), mask (B,M) -> logits (B,V), state (L,B,H)."""
        embedded = self.drop(self.tgt_embed(prev))
        output, context, state = self._step(embedded, state, *self._split(enc_out), mask)
        return self._readout(output, context, embedded), state

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing. src (B,S), src_len (B,), tgt_in (B,T) (BOS first) -> logits (B,T,V)."""
        enc_out, mask, state = self.encode(src, src_len)
        memory, keys = self._split(enc_out)
        embedded = self.drop(self.tgt_embed(tgt_in))
        if self.attention is None:
            # The context does not depend on the decoder state: one fused GRU call over all steps.
            context = memory.expand(-1, tgt_in.shape[1], -1)
            outputs, _ = self.decoder(torch.cat([embedded, context], dim=2), state)
        else:
            step_outputs, contexts = [], []
            for step_embedded in embedded.unbind(1):  # unbind, not [:, t]: its backward is one stack
                output, context, state = self._step(step_embedded, state, memory, keys, mask)
                step_outputs.append(output)
                contexts.append(context)
            outputs, context = torch.stack(step_outputs, 1), torch.stack(contexts, 1)
        return self._readout(outputs, context, embedded)
