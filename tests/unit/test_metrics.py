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


def test_classification_metrics_count_classes_absent_from_the_data_as_sklearn_does():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 150)  # classes 4 and 5 of 6 never occur, in labels or predictions
    preds = np.where(rng.random(150) < 0.5, labels, rng.integers(0, 4, 150))
    got = classification_metrics(preds, labels, 6)
    every = list(range(6))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, preds, labels=every, average="macro", zero_division=0))
    assert got["recall_macro"] == pytest.approx(
        recall_score(labels, preds, labels=every, average="macro", zero_division=0))
    assert got["f1_weighted"] == pytest.approx(f1_score(labels, preds, average="weighted"))
    assert got["accuracy"] == pytest.approx(np.mean(preds == labels))


def test_regression_metrics_match_sklearn_and_a_constant_gives_zero_correlation():
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(2)
    y = rng.normal(size=300)
    p = y + rng.normal(scale=0.5, size=300)
    got = regression_metrics(p.astype(np.float32), y)
    assert got["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-6)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-6)
    constant = regression_metrics(np.full(5, 2.0), np.arange(5.0))
    assert constant["pearson"] == 0.0 and constant["spearman"] == 0.0
    assert constant["mse"] == pytest.approx(np.mean((2.0 - np.arange(5.0)) ** 2))


def test_confusion_table_equals_sklearns_matrix():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(3)
    labels, preds = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    names = ["negative", "neutral", "positive", "mixed"]
    rows = confusion(preds, labels, names).splitlines()[2:]
    table = [[int(v) for v in row.split()[1:]] for row in rows]
    assert [row.split()[0] for row in rows] == names
    assert table == confusion_matrix(labels, preds, labels=range(4)).tolist()


def test_entity_metrics_per_type_and_perfect_prediction():
    true = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    assert entity_metrics(true, true) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0,
                                          "f1_LOC": 1.0, "f1_ORG": 1.0, "f1_PER": 1.0}
    # a span with the right type but the wrong end is wrong: no partial credit
    pred = [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    got = entity_metrics(pred, true)
    assert got["f1_PER"] == 0.0 and got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    # B- always starts a new entity, even right after one of the same type
    assert extract_entities(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 3)}
