"""Built-in metrics equal scikit-learn's (and a hand count for entities) on known predictions."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from fine_tune.core.metrics import classification_metrics, confusion, entity_metrics, extract_entities, \
    regression_metrics


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, 200))
    preds[preds == 4] = 3  # a class never predicted: zero_division must not crash
    got = classification_metrics(preds, labels, 5)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    for avg in ("weighted", "macro"):
        assert got[f"f1_{avg}"] == pytest.approx(f1_score(labels, preds, average=avg, zero_division=0))
        assert got[f"precision_{avg}"] == pytest.approx(precision_score(labels, preds, average=avg, zero_division=0))
        assert got[f"recall_{avg}"] == pytest.approx(recall_score(labels, preds, average=avg, zero_division=0))


def test_regression_metrics():
    from scipy.stats import pearsonr, spearmanr

    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    p = np.array([1.5, 1.5, 3.5, 3.0, 5.5])
    got = regression_metrics(p, y)
    assert got["mse"] == pytest.approx(np.mean((p - y) ** 2))
    assert got["mae"] == pytest.approx(np.mean(np.abs(p - y)))
    assert got["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert got["spearman"] == pytest.approx(spearmanr(p, y)[0])


def test_entity_spans_conll_style():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "O", "B-ORG", "I-PER"]
    assert extract_entities(tags) == {("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("ORG", 7, 8), ("PER", 8, 9)}


def test_entity_f1_hand_computed():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    got = entity_metrics(pred, true)
    # true: PER(0-2) LOC(3) ORG PER -> 4; predicted: PER(0-2) ORG(3) ORG -> 3; correct: PER, ORG -> 2
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 4)
    assert got["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert got["f1_LOC"] == 0.0 and got["f1_ORG"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(5 / 7)


def test_confusion_matrix_text():
    text = confusion(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["neg", "neu", "pos"])
    rows = text.splitlines()
    assert rows[2].split() == ["neg", "1", "0", "0"]
    assert rows[4].split() == ["pos", "0", "1", "1"]
