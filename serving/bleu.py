"""Corpus BLEU and chrF with sacrebleu, over any number of references per sentence."""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-sentence reference lists -> sacrebleu's reference streams, padded with None.

    Stream k holds every sentence's k-th reference; sacrebleu skips None, so sentences may have
    different numbers of references.
    """
    width = max((len(refs) for refs in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Detokenised hypotheses and references -> {"bleu", "chrf", "bleu_signature", "chrf_signature"}."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    streams = reference_streams(references)
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, streams)
    chrf_score = chrf.corpus_score(hypotheses, streams)
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
