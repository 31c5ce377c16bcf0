"""Task metrics: GLUE (scikit-learn / scipy) and SQuAD exact match / F1 (official scripts).

All scores are percentages (0-100), as GLUE, SQuAD and the AutoTinyBERT paper report them.
Nothing here needs the network: `evaluate.load(...)` would download its scripts at run time.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Mapping, Sequence

# Which metrics each GLUE task reports (GLUE paper, Table 1; the GLUE leaderboard).
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

# The tasks of the AutoTinyBERT / BERT GLUE dev average. WNLI is left out, as in BERT
# (Devlin et al. 2019, sec. 4.1: its dev set is adversarial to training) and the paper's tables.
GLUE_AVERAGE_TASKS = ("sst2", "mnli", "mrpc", "cola", "qnli", "qqp", "stsb", "rte")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _check_lengths(predictions, labels)
    return 100.0 * sum(int(p == g) for p, g in zip(predictions, labels)) / len(labels)


def binary_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1: "paraphrase" / "duplicate"), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    _check_lengths(predictions, labels)
    return 100.0 * float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (CoLA); 0 when one side is constant, as scikit-learn defines it."""
    from sklearn.metrics import matthews_corrcoef

    _check_lengths(predictions, labels)
    return 100.0 * float(matthews_corrcoef(labels, predictions))


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, labels)


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, labels)


def _correlation(function, predictions, labels) -> float:
    _check_lengths(predictions, labels)
    if len(set(predictions)) < 2 or len(set(labels)) < 2:
        return 0.0  # undefined for a constant input; a collapsed regressor scores 0, not NaN
    return 100.0 * float(function(predictions, labels)[0])


def _check_lengths(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The metrics GLUE reports for `task`, from label indices (or scores for STS-B)."""
    functions = {"accuracy": accuracy, "f1": binary_f1, "mcc": matthews, "pearson": pearson, "spearman": spearman}
    return {name: functions[name](predictions, labels) for name in GLUE_METRICS[task]}


def task_score(metrics: Mapping[str, float]) -> float:
    """One number per task: the mean of its metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson
    and Spearman), as the GLUE leaderboard and the AutoTinyBERT tables average them."""
    return sum(metrics.values()) / len(metrics)


def glue_average(task_scores: Mapping[str, float]) -> float | None:
    """Mean of the per-task scores over the GLUE average tasks present (None if none is).

    MNLI enters with its matched-dev score (the paper's "MNLI" column); WNLI never enters.
    """
    present = [task_scores[t] for t in GLUE_AVERAGE_TASKS if t in task_scores]
    return sum(present) / len(present) if present else None


# --- SQuAD ---------------------------------------------------------------------------------
# Normalisation and scores follow the official evaluation scripts (evaluate-v1.1.py and
# evaluate-v2.0.py from rajpurkar.github.io/SQuAD-explorer).

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 after normalisation; two empty answers agree (v2.0 no-answer rule)."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def gold_texts(answers: Iterable[str]) -> list[str]:
    """The gold answers scored against: those that survive normalisation, else [""] (no answer)."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(
    predictions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    null_odds: Mapping[str, float] | None = None,
    span_predictions: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Exact match and F1 (max over the gold answers, mean over questions, in %).

    `answers` maps every question id to its gold texts (empty for an unanswerable v2.0 question);
    a missing prediction scores 0, as in the official scripts. With unanswerable questions
    present, the HasAns_/NoAns_ breakdown is added, and with `null_odds` (per question: null
    score minus best span score) the official best threshold search too (`best_f1`,
    `best_f1_thresh`, ...), which tells which --null-score-threshold to use. The sweep answers
    each question with `span_predictions` (its best non-null span; default `predictions`).
    """
    if not answers:
        raise ValueError("no questions to score")
    exact, f1 = _per_question(predictions, answers)
    result = {"exact_match": _mean_percent(exact.values()), "f1": _mean_percent(f1.values())}
    has_answer = [qid for qid, gold in answers.items() if gold_texts(gold) != [""]]
    no_answer = [qid for qid in answers if qid not in set(has_answer)]
    if no_answer:
        result["HasAns_exact"] = _mean_percent(exact[q] for q in has_answer) if has_answer else 0.0
        result["HasAns_f1"] = _mean_percent(f1[q] for q in has_answer) if has_answer else 0.0
        result["NoAns_exact"] = _mean_percent(exact[q] for q in no_answer)
        result["NoAns_f1"] = _mean_percent(f1[q] for q in no_answer)
        if null_odds is not None:
            spans = predictions if span_predictions is None else span_predictions
            span_exact, span_f1 = _per_question(spans, answers)
            for name, per_question in (("exact", span_exact), ("f1", span_f1)):
                best, threshold = _best_threshold(spans, per_question, null_odds, set(no_answer))
                result[f"best_{name}"], result[f"best_{name}_thresh"] = best, threshold
    return result


def _per_question(predictions, answers) -> tuple[dict[str, float], dict[str, float]]:
    exact, f1 = {}, {}
    for qid, gold in answers.items():
        golds = gold_texts(gold)
        predicted = predictions.get(qid)
        exact[qid] = 0.0 if predicted is None else max(exact_match(predicted, g) for g in golds)
        f1[qid] = 0.0 if predicted is None else max(token_f1(predicted, g) for g in golds)
    return exact, f1


def _mean_percent(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values)


def _best_threshold(predictions, per_question, null_odds, no_answer) -> tuple[float, float]:
    """evaluate-v2.0.py `find_best_thresh`: sweep the no-answer threshold over the observed odds."""
    score = current = float(len(no_answer))  # everything predicted "no answer"
    best_threshold = 0.0
    for qid in sorted(per_question, key=lambda q: null_odds.get(q, math.inf)):
        if qid not in null_odds:
            continue
        if qid not in no_answer:
            diff = per_question[qid]
        else:
            diff = -1.0 if predictions.get(qid) else 0.0
        current += diff
        if current > score:
            score, best_threshold = current, null_odds[qid]
    return 100.0 * score / len(per_question), best_threshold
