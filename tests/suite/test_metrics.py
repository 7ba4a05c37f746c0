"""GLUE metrics against values computed by hand."""

import math

import pytest

from sparsegrad.suite.run import metrics


def test_accuracy_and_f1_by_hand():
    y = [1, 0, 1, 1, 0, 0]
    p = [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(p, y) == pytest.approx(4 / 6)
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, f1 2/3
    assert metrics.f1_binary(p, y) == pytest.approx(2 / 3)


def test_matthews_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_correlation(p, y) == pytest.approx(expected)  # 0.5
    assert metrics.matthews_correlation([1] * 8, y) == 0.0  # constant predictions: MCC 0


def test_pearson_spearman_by_hand():
    y = [1.0, 2.0, 3.0, 4.0]
    p = [2.0, 4.0, 6.0, 9.0]
    mp, my = sum(p) / 4, sum(y) / 4
    cov = sum((a - mp) * (b - my) for a, b in zip(p, y))
    sp = math.sqrt(sum((a - mp) ** 2 for a in p))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    assert metrics.pearson(p, y) == pytest.approx(cov / (sp * sy))
    assert metrics.spearman(p, y) == pytest.approx(1.0)  # monotone
    assert metrics.spearman([4.0, 3.0, 2.0, 1.0], y) == pytest.approx(-1.0)


def test_constant_predictions_give_nan_not_an_error():
    assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    assert math.isnan(metrics.spearman([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))


def test_compute_table_and_unknown_metric():
    out = metrics.compute(("accuracy", "f1"), [1, 0], [1, 1])
    assert out == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(("bleu",), [1], [1])


def test_perplexity_and_is_better():
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(float("nan")) == math.inf
    assert metrics.is_better(0.5, None, True)
    assert metrics.is_better(0.4, 0.5, False)
    assert not metrics.is_better(float("nan"), 0.1, True)
    assert metrics.is_better(0.1, float("nan"), True)
