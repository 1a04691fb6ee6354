"""Evaluation metrics from gathered predictions (scikit-learn; entity F1 in the CoNLL sense).

The loop gathers per-example predictions from every process with ``gather_for_metrics``
(which drops the duplicates that pad the last batch), so these functions see each example
exactly once, whatever the world size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fine_tune.core.errors import UserError, first_line


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(labels, preds))}
    label_ids = list(range(num_labels))
    for avg in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=label_ids, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    return out


def multilabel_metrics(scores: np.ndarray, labels: np.ndarray, names: list[str], threshold: float) -> dict:
    """Multi-label metrics at ``threshold`` on the sigmoid scores (examples x labels): micro and
    macro precision/recall/F1, subset accuracy (the whole label set right), Hamming loss (the
    share of wrong (example, label) decisions) and each label's F1 (``f1_<name>``)."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

    preds = (np.asarray(scores) >= threshold).astype(int)
    gold = np.asarray(labels).astype(int)
    out = {"accuracy": float(accuracy_score(gold, preds)), "hamming_loss": float(hamming_loss(gold, preds))}
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(gold, preds, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    per_label = f1_score(gold, preds, average=None, zero_division=0)
    out.update({f"f1_{name}": float(v) for name, v in zip(names, per_label)})
    return out


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out = {"mse": float(np.mean((preds - labels) ** 2)), "mae": float(np.mean(np.abs(preds - labels)))}
    constant = np.ptp(preds) == 0 or np.ptp(labels) == 0
    out["pearson"] = 0.0 if constant else float(pearsonr(preds, labels)[0])
    out["spearman"] = 0.0 if constant else float(spearmanr(preds, labels)[0])
    return out


def extract_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO/IOB tag sequence, as conlleval reads them:
    an I- tag that does not continue an entity of its type starts a new one."""
    spans, current = set(), None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, etype = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = current is not None and prefix == "I" and etype == current[0]
        if current is not None and not continues:
            spans.add((current[0], current[1], i))
            current = None
        if prefix in ("B", "I") and not continues:
            current = (etype, i)
    return spans


def entity_metrics(pred_tags: list[list[str]], true_tags: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 (micro, and per type) plus token accuracy."""
    tp, n_pred, n_true = Counter(), Counter(), Counter()
    correct = total = 0
    for pred, true in zip(pred_tags, true_tags):
        p_spans, t_spans = extract_entities(pred), extract_entities(true)
        for span in p_spans:
            n_pred[span[0]] += 1
        for span in t_spans:
            n_true[span[0]] += 1
        for span in p_spans & t_spans:
            tp[span[0]] += 1
        correct += sum(a == b for a, b in zip(pred, true))
        total += len(true)

    def prf(t, p, g):
        precision = t / p if p else 0.0
        recall = t / g if g else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    out = {}
    out["precision"], out["recall"], out["f1"] = prf(sum(tp.values()), sum(n_pred.values()), sum(n_true.values()))
    out["accuracy"] = correct / total if total else 0.0
    for etype in sorted(set(n_true) | set(n_pred)):
        _, _, f1 = prf(tp[etype], n_pred[etype], n_true[etype])
        out[f"f1_{etype}"] = f1
    return out


def load_extra_metric(name: str):
    """An `evaluate` metric by hub name or local path, with a clear message where it cannot load."""
    try:
        import evaluate

        return evaluate.load(name)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, missing deps
        raise UserError(f"--metric {name}: could not load it with evaluate.load ({first_line(e)}). Offline, give a local "
                        "metric script path; accuracy, precision, recall and F1 are built in") from None


def confusion(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> str:
    """A confusion matrix as an aligned text table (rows: true label, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    from fine_tune.core.tables import format_table

    m = confusion_matrix(labels, preds, labels=list(range(len(names))))
    return format_table(["true \\ predicted", *names], [[name, *map(int, row)] for name, row in zip(names, m)])
