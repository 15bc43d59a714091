"""Translation: parallel data, sentencepiece, a GRU encoder-decoder, greedy and beam search, BLEU.

Importing the package does not import torch: ``seq2seq.data`` and ``serving.search`` are numpy-only,
so the exported translator can reuse the very same search code over onnxruntime.
"""
