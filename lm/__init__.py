"""Recurrent language models: corpora, tokenizers, partitioning, models, training, evaluation, export.

Importing the package does not import torch: the torch-free parts (vocabulary, tokenizers,
sampling, data sets) are shared with ``serving/``.
"""
