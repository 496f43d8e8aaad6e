"""Text statistics of generations (DESIGN.md §3): n-gram repetition, diversity, reference similarity.

Pure functions on token ids or strings, no model:

- :func:`ngram_repetition` is Ext-Sub's ``ngram_metrics`` (``eval/ngram_rep_eval.py`` at
  HITsz-TMG/Ext-Sub@2d16049): per generation, ``1 − unique n-grams / n-grams`` for n = 1..4
  (0 when the generation has fewer than n tokens); the metric is the mean over generations.
- :func:`distinct_share` is SKU's diversity: unique tokens / tokens of one generation.
- :func:`bleu` and :func:`rouge` are lm-evaluation-harness's TruthfulQA-generation scorers
  (``lm_eval/tasks/truthfulqa/utils.py``, t5-style sentence BLEU and ROUGE F-measures ×100);
  :func:`reference_scores` is its max-over-true vs max-over-false rule.
- :func:`rouge_l` is the ROUGE-L F-measure of two strings, in [0, 1] (SKU similarity). Text
  without a single word (emoji, symbols, empty) has no ``rouge_score`` token, which made two
  identical emoji-only answers score 0; such pairs are compared by their whitespace-separated
  chunks instead, so identical answers always score 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "bleu",
    "distinct_share",
    "ngram_repetition",
    "reference_scores",
    "rouge",
    "rouge_l",
]


def ngram_repetition(tokens: Sequence[int], n: int) -> float:
    """``1 − |unique n-grams| / |n-grams|`` of one token sequence; 0.0 when it has no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_share(tokens: Sequence[int]) -> float:
    """Unique tokens / tokens of one sequence (0.0 for an empty one)."""
    return len(set(tokens)) / len(tokens) if tokens else 0.0


def bleu(reference: str, prediction: str) -> float:
    """Sentence BLEU (0–100) with lm-eval's TruthfulQA settings (sacrebleu, `intl` tokens, exp smoothing)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(
        [prediction],
        [[reference]],
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize="intl",
        use_effective_order=False,
    ).score


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])


def rouge(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (0–100) as lm-eval's TruthfulQA computes them.

    lm-eval runs one pair through a bootstrap aggregator; for one pair its ``mid`` is the pair's
    own score, so the plain score is returned here.
    """
    scores = _rouge_scorer().score(reference.replace(" . ", ".\n"), prediction.replace(" . ", ".\n"))
    return {name: score.fmeasure * 100 for name, score in scores.items()}


class _Chunks:
    """``rouge_score`` tokenizer for word-less text: lower-cased whitespace-separated chunks."""

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


@lru_cache(maxsize=2)
def _rouge_l_scorer(chunks: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chunks() if chunks else None)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure in [0, 1] (alphanumeric tokens, as ``rouge_score`` does).

    When either side has no such token (emoji, symbols, nothing), both sides are compared by
    their whitespace-separated chunks; two answers with no chunk at all (both empty) score 1.
    """
    from rouge_score import tokenize

    if tokenize.tokenize(reference, None) and tokenize.tokenize(prediction, None):
        return float(_rouge_l_scorer(False).score(reference, prediction)["rougeL"].fmeasure)
    if not reference.split() and not prediction.split():
        return 1.0
    return float(_rouge_l_scorer(True).score(reference, prediction)["rougeL"].fmeasure)


def reference_scores(prediction: str, correct: Sequence[str], incorrect: Sequence[str]) -> dict[str, float]:
    """lm-eval's TruthfulQA-generation metrics of one answer: ``{bleu,rouge1,rouge2,rougeL}_{max,diff,acc}``.

    ``*_max`` is the best score against a true reference, ``*_diff`` that minus the best score
    against a false one, ``*_acc`` 1.0 when the true side wins.
    """
    import numpy as np

    refs = list(correct) + list(incorrect)
    k = len(correct)
    per_metric = {
        "bleu": [bleu(ref, prediction) for ref in refs],
    }
    rouges = [rouge(ref, prediction) for ref in refs]
    per_metric |= {
        "rouge1": [r["rouge1"] for r in rouges],
        "rouge2": [r["rouge2"] for r in rouges],
        "rougeL": [r["rougeLsum"] for r in rouges],
    }
    out: dict[str, float] = {}
    for name, scores in per_metric.items():
        best_true, best_false = float(np.nanmax(scores[:k])), float(np.nanmax(scores[k:]))
        out[f"{name}_max"] = best_true
        out[f"{name}_diff"] = best_true - best_false
        out[f"{name}_acc"] = float(best_true > best_false)
    return out
