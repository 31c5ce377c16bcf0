"""Metrics against hand-computed values (GLUE; SQuAD's official normalisation and scores)."""

import math

import pytest

from autotinybert.tasks import metrics


def test_accuracy_and_binary_f1():
    labels, predictions = [1, 1, 0, 0], [1, 0, 1, 0]
    # TP=1 FP=1 FN=1: precision = recall = 1/2.
    assert metrics.glue_metrics("mrpc", predictions, labels) == {"f1": 50.0, "accuracy": 50.0}
    assert metrics.glue_metrics("qqp", [0, 0, 0, 0], labels)["f1"] == 0.0  # no positive predicted
    assert metrics.glue_metrics("rte", [1, 1, 0, 1], labels) == {"accuracy": 75.0}


def test_matthews_correlation():
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3) = 2 / sqrt(12).
    assert metrics.glue_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])["mcc"] == pytest.approx(100 * 2 / math.sqrt(12))
    assert metrics.glue_metrics("cola", [1, 1, 1, 1], [1, 1, 0, 0])["mcc"] == 0.0  # constant prediction


def test_pearson_and_spearman():
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): cov 3, variances 2 and 42/9.
    scores = metrics.glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert scores["pearson"] == pytest.approx(100 * 3 / math.sqrt(2 * 42 / 9))
    assert scores["spearman"] == pytest.approx(100.0)
    # ranks differ by (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15) = 0.8.
    assert metrics.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)
    assert metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # collapsed regressor: 0, not NaN


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        metrics.accuracy([1, 0], [1, 0, 1])


def test_task_score_and_glue_average():
    assert metrics.task_score({"f1": 90.0, "accuracy": 80.0}) == 85.0
    scores = {"mrpc": 85.0, "stsb": 70.0, "mnli": 60.0, "wnli": 10.0, "squad": 99.0}
    # WNLI and SQuAD are not GLUE-average tasks.
    assert metrics.glue_average(scores) == pytest.approx((85 + 70 + 60) / 3)
    assert metrics.glue_average({"wnli": 50.0}) is None


@pytest.mark.parametrize("text, normalised", [
    ("The Cat", "cat"),
    ("  an   apple,  a pear!  ", "apple pear"),
    ("theatre and anthem", "theatre and anthem"),      # articles only as whole words
    ("U.S.", "us"),                                     # punctuation removed, not split on
    ("A", ""),
    ("Smith's  'the' dog", "smiths dog"),
])
def test_normalize_answer(text, normalised):
    assert metrics.normalize_answer(text) == normalised


def test_exact_match_and_f1():
    assert metrics.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    # tokens (big, cat) vs (cat, sat): overlap 1, precision = recall = 1/2.
    assert metrics.token_f1("the big cat", "a cat sat") == pytest.approx(0.5)
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # Counter overlap, not sets


def test_squad_scores_take_the_best_gold_answer():
    answers = {"q1": ["Denver Broncos", "the Broncos", "Broncos"], "q2": ["1990s"]}
    predictions = {"q1": "Broncos", "q2": "the 1980s"}
    scores = metrics.squad_scores(predictions, answers)
    assert scores == {"exact_match": 50.0, "f1": 50.0}  # q1 exact; q2 shares no token
    assert metrics.squad_scores({"q1": "Broncos"}, answers)["f1"] == 50.0  # a missing prediction scores 0


def test_squad_v2_no_answer_and_threshold():
    answers = {"q1": ["paris"], "q2": []}
    assert metrics.gold_texts([]) == [""] and metrics.gold_texts(["the"]) == [""]
    scores = metrics.squad_scores({"q1": "paris", "q2": ""}, answers)
    assert scores["exact_match"] == 100.0 and scores["NoAns_f1"] == 100.0 and scores["HasAns_f1"] == 100.0
    assert metrics.squad_scores({"q1": "", "q2": "x"}, answers)["f1"] == 0.0
    # Sweep: answer q1 (odds -2, right) but not q2 (odds 1): best 2/2 at threshold -2.
    scores = metrics.squad_scores({"q1": "paris", "q2": ""}, answers, null_odds={"q1": -2.0, "q2": 1.0},
                                  span_predictions={"q1": "paris", "q2": "x"})
    assert scores["best_f1"] == 100.0 and scores["best_f1_thresh"] == -2.0
    assert scores["best_exact"] == 100.0
