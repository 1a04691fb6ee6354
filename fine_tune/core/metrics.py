"""Evaluation metrics from gathered predictions (scikit-learn; entity F1 in the CoNLL sense).

The loop gathers per-example predictions from every process with ``gather_for_metrics``
(which drops the duplicates that pad the last batch), so these functions see each example
exactly once, whatever the world size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fine_tune.core.errors import UserError, first_line


# Which metrics a task reports, and their names, each task says (fine_tune.core.tasks); the
# functions below return exactly the names the tasks list (checked in the tests).


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


# Tag schemes: IOB1 and IOB2 (B-, I-), IOBES (B-, I-, E-, S-), BILOU (B-, I-, L-, U-: L is E
# and U is S), and bare types ("PER", the IO scheme: a run of one type is one entity).
_PREFIX = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}


def split_tag(tag: str) -> tuple[str, str]:
    """('B'|'I'|'E'|'S'|'O', type) of a tag; a tag without a known prefix is a bare type (I-)."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, sep, etype = tag.partition("-")
    if sep and prefix in _PREFIX and etype:
        return _PREFIX[prefix], etype
    return "I", tag


def extract_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a tag sequence by conlleval's rules (as seqeval's default
    mode reads them): an entity ends after E/S or before a tag that starts another one; an
    I or E that does not continue an entity of its type starts a new one."""
    spans, start = set(), None
    prev_tag, prev_type = "O", ""
    for i, raw in enumerate(list(tags) + ["O"]):
        tag, etype = split_tag(raw)
        ends = prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O")) or \
            (prev_tag != "O" and prev_type != etype)
        starts = tag in ("B", "S") or (tag in ("I", "E") and prev_tag in ("E", "S", "O")) or \
            (tag != "O" and prev_type != etype)
        if start is not None and ends:
            spans.add((prev_type, start, i))
            start = None
        if starts:
            start = i
        prev_tag, prev_type = tag, etype
    return spans


def entity_metrics(pred_tags: list[list[str]], true_tags: list[list[str]], label_names=()) -> dict:
    """Entity-level precision/recall/F1 (micro, and per type: every type of ``label_names``
    and any other found) plus token accuracy."""
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
    types = {split_tag(t)[1] for t in label_names} - {""}
    for etype in sorted(set(n_true) | set(n_pred) | types):
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


def extra_metric_outputs(metrics, task) -> list[str]:
    """The names the extra --metric metrics add to an evaluation (as the loop names them),
    learnt by scoring two predictions: a metric that cannot score this task fails here, before work."""
    names = []
    for metric in metrics:
        try:
            computed = metric.compute(predictions=[0, 1], references=[0, 1])
        except Exception as e:  # noqa: BLE001 - the metric's own checks
            raise UserError(f"--metric {metric.name}: it cannot score {task.name} predictions ({first_line(e)})") from None
        names += [f"{metric.name}_{k}" if k in task.metrics else k for k, v in (computed or {}).items()
                  if isinstance(v, (int, float))]
    return names


def confusion(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> str:
    """A confusion matrix as an aligned text table (rows: true label, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    from fine_tune.core.tables import format_table

    m = confusion_matrix(labels, preds, labels=list(range(len(names))))
    return format_table(["true \\ predicted", *names], [[name, *map(int, row)] for name, row in zip(names, m)])
