"""Metrics against hand-computed values and sklearn's formulas (written out here)."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.train.metrics import classification_metrics, exact_match, final_number, perplexity


def test_binary_metrics_by_hand():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    m = classification_metrics(preds, labels, 2)
    tp, tn, fp, fn = 2, 2, 1, 1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)


def test_multiclass_f1_is_macro_and_mcc_matches_gorodkin():
    preds = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0, 2])
    m = classification_metrics(preds, labels, 3)
    f1s = [1.0, 2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * (2 / 3) / (4 / 3)]
    assert m["f1"] == pytest.approx(sum(f1s) / 3)
    # Gorodkin's R_K from the confusion matrix C: (c*s - sum p_k t_k) / sqrt((s^2 - sum p^2)(s^2 - sum t^2))
    c, s, p, t = 5, 7, [2, 2, 3], [2, 2, 3]
    expected = (c * s - sum(a * b for a, b in zip(p, t))) / math.sqrt((s * s - sum(x * x for x in p)) *
                                                                      (s * s - sum(x * x for x in t)))
    assert m["mcc"] == pytest.approx(expected)


def test_constant_prediction_has_zero_mcc():
    m = classification_metrics(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)
    assert m["mcc"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the answer is 1,000 dollars", "1000"),
    ("#### -3.50", "-3.5"),
    ("the total is 12.0.", "12"),
    ("no number here", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_match_compares_final_numbers():
    refs = ["... #### 72", "... #### 10"]
    assert exact_match(["I think it is 72", "it is 11"], refs) == 0.5
    assert perplexity(0.0) == 1.0 and perplexity(1000.0) == float("inf")
