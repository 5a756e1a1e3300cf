"""Per-item task metrics of generated answers against references.

Each function scores one (prediction, reference) pair, so that a gate can compare two
models item by item (lifecycle/eval/stats.py). `score_all` applies several by name:

    from lifecycle.eval.metrics import score_all
    per_item = score_all(["exact_match", "token_f1", "rouge_l"], predictions, references)
    per_item["token_f1"]  # one float per item

- exact_match: 1.0 when the prediction equals the reference after stripping whitespace.
- token_f1: SQuAD's F1 over normalized tokens (lowercase, punctuation and English articles
  removed), the standard metric for short free-form answers.
- rouge_l: ROUGE-L F-measure from Google's `rouge-score` package (its default tokenizer,
  with Porter stemming off): longest-common-subsequence overlap for longer answers. Its
  tokenizer keeps only ASCII letters and digits, so text in other scripts scores 0 there:
  use token_f1 for those.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1; one empty: 0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge() -> object:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}
"""The text metrics by name (answer perplexity and multiple-choice accuracy need a model)."""


def score_all(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, list[float]]:
    """Per-item scores of each named metric."""
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: choose from {sorted(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references: one each"
        )
    return {
        n: [METRICS[n](p, r) for p, r in zip(predictions, references, strict=True)] for n in names
    }
