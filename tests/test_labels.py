"""Labels as real data has them: multi-label classification, class weights, label smoothing.

The losses stay normalised over the whole optimizer step (examples' class weights for a
weighted single-label loss, every (example, label) pair for multi-label), so one process with
batch 8, 4 x 2 accumulation and two DDP processes give the same weights (tiny BERT, 61
examples: the last step is short and splits unevenly). Metrics are checked against
scikit-learn and hand counts; bad label input fails in one line before the output folder is
touched; real-data runs (WNUT-2016 entity types, a rare sentiment class) must beat their
baselines by margins measured here.
"""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ENV, LABELS, ROOT, WORDS, load_weights, read_metrics, relative_difference, run_recipe, \
    run_train, train_args, write_jsonl

TOLERANCE = 1e-4  # of the largest weight change, as in test_topologies.py
# real-data margins, below what was measured (docs/tasks.md)
MULTILABEL_MIN_F1_MICRO = 0.15  # measured 0.213 after one epoch; both baselines score 0
CLASS_WEIGHTS_MIN_GAIN = 0.05  # measured: +0.095 (seed 42) and +0.196 (seed 7) over both
CUES = {"negative": "awful terrible", "neutral": "okay quite", "positive": "great lovely"}


def multilabel_rows(n: int, seed: int) -> list[dict]:
    """Texts of very different lengths carrying 0 to 3 labels (each label has its cue words);
    'neutral' is rare, so class weights matter."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = [name for name, p in zip(LABELS, (0.5, 0.15, 0.4)) if rng.random() < p]
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 40))]
        for name in chosen:
            words.insert(rng.randint(0, len(words)), rng.choice(CUES[name].split()))
        rows.append({"text": " ".join(words), "labels": chosen})
    return rows


def imbalanced_rows(n: int, seed: int) -> list[dict]:
    """Single-label texts, 'neutral' on about 1 in 8 rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choices(LABELS, weights=(4, 1, 3))[0]
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 40))]
        words.insert(rng.randint(0, len(words)), rng.choice(CUES[label].split()))
        rows.append({"text": " ".join(words), "label": label})
    return rows


# ------------------------------------------------------------------ the loss
def test_step_loss_is_torchs_weighted_mean():
    """Per-example sums over the data's units give exactly torch's mean-reduced losses."""
    import torch
    import torch.nn.functional as F

    from fine_tune.core.model import example_losses

    torch.manual_seed(0)
    logits, y = torch.randn(9, 3), torch.tensor([0, 1, 2, 0, 0, 2, 1, 0, 2])
    w, ones = torch.tensor([0.5, 4.0, 1.5]), torch.ones(9)
    per_example = example_losses(logits, y, ones, "text-classification", w, 0.1)
    expected = F.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    assert float(per_example.sum() / w[y].sum()) == pytest.approx(float(expected), rel=1e-6)
    multi = (torch.rand(9, 3) > 0.6).float()
    per_example = example_losses(logits, multi, ones, "multi-label-classification", w)
    expected = F.binary_cross_entropy_with_logits(logits, multi, pos_weight=w)
    assert float(per_example.sum() / multi.numel()) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------ topologies
CASES = {
    "multi-label, pos_weight balanced": (multilabel_rows, {"task": "multi-label-classification",
                                                           "label_column": "labels", "class_weights": "balanced"}),
    "single-label, class weights balanced, smoothing 0.1": (imbalanced_rows, {"class_weights": "balanced",
                                                                              "label_smoothing_factor": 0.1}),
}
TOPOLOGIES = {"1 process, 4 x 2 accumulation": (None, None, 4, 2),
              "2 processes (gloo), batch 4": ("cpu_ddp.yaml", 2, 4, 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_on_every_topology(case, tiny_model, tmp_path):
    make, flags = CASES[case]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", make(61, seed=1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", make(23, seed=2))}
    runs = {}
    for name, (config, nproc, bs, acc) in {"1 process, batch 8": (None, None, 8, 1), **TOPOLOGIES}.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        run_train(train_args(tiny_model, files, out, per_device_train_batch_size=bs, gradient_accumulation_steps=acc,
                             max_steps=8, **flags), config, nproc)
        runs[name] = (load_weights(out / "final"), [r["loss"] for r in read_metrics(out) if "loss" in r])
    init = load_weights(tiny_model)
    ref_weights, ref_losses = runs["1 process, batch 8"]
    for name in TOPOLOGIES:
        weights, losses = runs[name]
        assert relative_difference(weights, ref_weights, init) < TOLERANCE, name
        assert losses == pytest.approx(ref_losses, rel=1e-4), name


def test_loss_units_come_from_the_data(tiny_model, tmp_path):
    """The sampler's units: each example's class weight (single-label), the number of labels
    (multi-label), so the normaliser of a step is known without communication."""
    from transformers import AutoTokenizer

    from fine_tune.core import data as D
    from fine_tune.core.config import config_from_dict

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", imbalanced_rows(40, seed=3))}
    cfg = config_from_dict({"train_file": str(files["train"]), "class_weights": "balanced",
                            "validation_split_percentage": 0})
    splits = D.load_raw_splits(cfg)
    info = D.infer_labels(splits, cfg)
    counts = [sum(r == n for r in splits["train"]["label"]) for n in info.names]
    assert info.class_weights == pytest.approx([40 / (3 * c) for c in counts])  # scikit-learn's 'balanced'
    train = D.tokenize_splits(splits, tokenizer, cfg, info)["train"]
    assert train["n_units"] == pytest.approx([info.class_weights[y] for y in train["labels"]])

    files = {"train": write_jsonl(tmp_path / "multi.jsonl", multilabel_rows(40, seed=3))}
    cfg = config_from_dict({"train_file": str(files["train"]), "task": "multi-label-classification",
                            "label_column": "labels", "class_weights": '{"neutral": 4}',
                            "validation_split_percentage": 0})
    splits = D.load_raw_splits(cfg)
    info = D.infer_labels(splits, cfg)
    assert info.names == LABELS and info.class_weights == [1.0, 4.0, 1.0]
    train = D.tokenize_splits(splits, tokenizer, cfg, info)["train"]
    assert set(train["n_units"]) == {3.0}
    assert train["labels"][0] == [float(n in splits["train"][0]["labels"]) for n in LABELS]


# ------------------------------------------------------------------ metrics
def test_multilabel_metrics_against_scikit_learn_and_hand_counts():
    from sklearn.metrics import f1_score, hamming_loss, precision_score, recall_score

    from fine_tune.core.metrics import multilabel_metrics

    names = ["a", "b", "c"]
    gold = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.4, 0.0], [0.7, 0.8, 0.6], [0.2, 0.1, 0.3], [0.3, 0.3, 0.49]])
    m = multilabel_metrics(scores, gold, names, threshold=0.5)
    # by hand: predictions {a,c} {} {a,b,c} {} {}; TP 4 (a,c / a,b), FP 1 (c in row 3), FN 2 (b row 2, c row 5)
    assert m["precision_micro"] == pytest.approx(4 / 5)
    assert m["recall_micro"] == pytest.approx(4 / 6)
    assert m["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert m["accuracy"] == pytest.approx(2 / 5)  # rows 1 and 4 exactly right
    assert m["hamming_loss"] == pytest.approx(3 / 15)
    assert m["f1_a"] == pytest.approx(1.0) and m["f1_b"] == pytest.approx(2 / 3)
    pred = (scores >= 0.5).astype(int)
    for avg in ("micro", "macro"):
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(gold, pred, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(gold, pred, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(gold, pred, average=avg))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(gold, pred))
    # the threshold moves the decisions: at 0.3 rows 4 and 5 gain labels
    low = multilabel_metrics(scores, gold, names, threshold=0.3)
    assert low["recall_micro"] == pytest.approx(1.0) and low["precision_micro"] < m["precision_micro"]
    # nothing predicted, nothing true: scikit-learn's zero_division=0, no warning-driven NaN
    empty = multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 3), dtype=int), names, 0.5)
    assert empty["accuracy"] == 1.0 and empty["hamming_loss"] == 0.0 and empty["f1_micro"] == 0.0


# ------------------------------------------------------------------ bad input
def _fails(tiny_model, tmp_path, train_rows, validation_rows, expected: str, **flags):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train_rows),
             "validation": write_jsonl(tmp_path / "validation.jsonl", validation_rows)}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    proc = run_train(train_args(tiny_model, files, out, max_steps=1, **flags), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert expected in errors[0], errors[0]
    # the output folder is untouched (but the run lock, fine_tune/core/outputs.py)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier result"
    return errors[0]


MULTI = {"task": "multi-label-classification", "label_column": "labels"}


def test_label_not_in_training(tiny_model, tmp_path):
    train = multilabel_rows(20, seed=1)
    validation = multilabel_rows(5, seed=2) + [{"text": "so so", "labels": ["positive", "sarcastic"]}]
    line = _fails(tiny_model, tmp_path, train, validation, "label 'sarcastic' in row 5", **MULTI)
    assert "which is not in the training split (negative, " in line


def test_non_list_json_label(tiny_model, tmp_path):
    train = multilabel_rows(20, seed=1)
    train[3]["labels"] = "neutral"  # a bare name among lists
    line = _fails(tiny_model, tmp_path, train, multilabel_rows(5, seed=2),
                  "must hold a list of label names per row for --task multi-label-classification", **MULTI)
    assert "(row 3 holds 'neutral')" in line


def test_empty_label_column(tiny_model, tmp_path):
    train = [{"text": r["text"], "labels": []} for r in multilabel_rows(20, seed=1)]
    line = _fails(tiny_model, tmp_path, train, multilabel_rows(5, seed=2), "holds no labels (every row is empty)",
                  **MULTI)
    assert "multi-label classification needs at least one label name" in line


def test_class_weights_name_a_label(tiny_model, tmp_path):
    line = _fails(tiny_model, tmp_path, imbalanced_rows(20, seed=1), imbalanced_rows(5, seed=2),
                  "--class_weights names label 'postive'", class_weights='{"postive": 2}')
    assert "which is not one of the labels" in line


@pytest.mark.parametrize("flags, expected", [
    ({"class_weights": "1,-2"}, "--class_weights '1,-2' is not allowed"),
    ({"class_weights": "balanced", "task": "regression"}, "--class_weights applies to"),
    ({"label_smoothing_factor": 0.1, "task": "multi-label-classification"}, "--label_smoothing_factor applies to"),
    ({"label_smoothing_factor": 1.0}, "must be in [0, 1)"),
    ({"multilabel_threshold": 1.5}, "--multilabel_threshold 1.5 is not allowed"),
])
def test_bad_label_options(flags, expected):
    from fine_tune.core.config import ConfigError, config_from_dict

    import re

    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_from_dict(flags)


# ------------------------------------------------------------------ train, predict, explore
def test_csv_label_sets_train_predict_and_explore(tiny_model, tmp_path):
    """A CSV with '|'-joined label cells (an empty cell: no label) trains; final/ is a
    multi-label model that predict and pipeline() read as one; explore shows the label sets."""
    import csv

    for split, n, seed in (("train", 48, 1), ("validation", 16, 2)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "labels"])
            for r in multilabel_rows(n, seed):
                writer.writerow([r["text"], "|".join(r["labels"])])
    files = {"train": tmp_path / "train.csv", "validation": tmp_path / "validation.csv"}
    out = tmp_path / "run"
    run_train(train_args(tiny_model, files, out, max_steps=4, per_device_train_batch_size=8, label_separator="|",
                         eval_strategy="steps", eval_steps=4, **MULTI))
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_f1_micro", "eval_f1_macro", "eval_accuracy", "eval_hamming_loss", "eval_f1_neutral"} <= set(results)
    assert results["metric_for_best_model"] == "eval_f1_micro" and results["eval_samples"] == 16
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"

    from transformers import pipeline

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scores = pipeline("text-classification", model=str(out / "final"), top_k=None)(["great awful movie"])[0]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(out / "final")("great awful movie", return_tensors="pt")).logits
    sigmoid = dict(zip(LABELS, logits[0].sigmoid().tolist()))  # one independent score per label, no softmax
    assert {s["label"]: s["score"] for s in scores} == pytest.approx(sigmoid, abs=1e-5)
    predict = [sys.executable, "-m", "fine_tune.commands.predict", "--model", str(out / "final")]
    proc = subprocess.run(predict + ["--text", "great awful movie", "--multilabel_threshold", "0.01"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shown, text = proc.stdout.strip().split("\t")
    assert text == "great awful movie" and sorted(s.split()[0] for s in shown.split(", ")) == sorted(LABELS)
    proc = subprocess.run(predict + ["--file", str(files["validation"]), "--label_column", "labels",
                                     "--label_separator", "|"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)  # a labelled file is scored: the metrics as JSON
    assert scored["f1_micro"] == pytest.approx(results["eval_f1_micro"], abs=1e-4)

    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.explore", "--train_file", str(files["train"]),
                           "--validation_file", str(files["validation"]), "--task", "multi-label-classification",
                           "--label_column", "labels", "--label_separator", "|", "--model_name_or_path",
                           str(tiny_model), "--json"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    labels = json.loads(proc.stdout)["labels"]
    rows = multilabel_rows(48, 1)
    assert labels["counts"]["train"] == {n: sum(n in r["labels"] for r in rows) for n in LABELS}
    assert labels["set_sizes"]["train"] == {str(k): sum(len(r["labels"]) == k for r in rows)
                                            for k in sorted({len(r["labels"]) for r in rows})}
    neutral = labels["counts"]["train"]["neutral"]
    assert labels["class_weights"]["recommended"] is True  # 'neutral' is on fewer than a quarter
    assert labels["class_weights"]["balanced"]["neutral"] == pytest.approx((48 - neutral) / neutral)
    all_negative = labels["all_negative_baseline"]["train"]
    assert all_negative["accuracy"] == pytest.approx(sum(not r["labels"] for r in rows) / 48)
    assert all_negative["f1_micro"] == 0.0


def test_explore_recommends_class_weights_for_imbalanced_single_label(tiny_model, tmp_path):
    rows = [{"text": f"text {i}", "label": "rare" if i % 10 == 0 else "common"} for i in range(50)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.explore", "--train_file", str(train),
                           "--model_name_or_path", str(tiny_model), "--validation_split_percentage", "0"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # scikit-learn's balanced weights: 50 / (2 x 45) and 50 / (2 x 5)
    assert "imbalanced (majority/minority 9.00): consider --class_weights balanced, which would weigh the loss " \
           "by common 0.556, rare 5" in proc.stdout


# ------------------------------------------------------------------ real data
def test_real_multilabel_entity_types_beat_the_baselines(tmp_path):
    """WNUT-2016 tweets labelled with the entity types they mention: the shipped recipe
    (balanced pos_weight) for one epoch. Both baselines predict no label here (the empty set
    is the most frequent set): micro F1 0 and subset accuracy = the share of test tweets
    without entities (0.674; one epoch does not beat that, see docs/tasks.md)."""
    from fine_tune.commands.prepare_data import prepare_entity_types

    data = prepare_entity_types(ROOT / "data")
    results = run_recipe("entity_types.yaml", data, tmp_path / "entity_types", num_train_epochs=1)
    assert results["test_samples"] == 239
    # measured: micro F1 0.213 (baselines 0), recall 0.62; person 0.32 and geo-loc 0.40 F1
    assert results["test_f1_micro"] > MULTILABEL_MIN_F1_MICRO, results
    assert results["test_recall_micro"] > 0.4, results
    assert results["test_f1_person"] > 0.2 and results["test_f1_geo-loc"] > 0.2, results


def test_real_class_weights_raise_macro_f1(tmp_path):
    """A rare class (strongly negative sentences, 5%): without weights the model predicts the
    majority class only (macro F1 at the majority baseline); balanced weights find the rare one."""
    from fine_tune.commands.prepare_data import prepare_strongly_negative

    data = prepare_strongly_negative(ROOT / "data")
    # 1,200 sentences (58 strongly negative) at twice the recipe's learning rate; max length 48
    # shortens only the sentences over the train p95 of 45 tokens. Measured macro F1 on the first
    # 500 test sentences (25 strongly negative): balanced 0.582 (seed 42) and 0.683 (seed 7);
    # unweighted 0.487 with either seed, the majority baseline's (always 'other'). At batch 16
    # the weighted run did not learn (the rare class is then missing from most steps).
    runs = {weights: run_recipe("strongly_negative.yaml", data, tmp_path / weights, class_weights=weights,
                                max_train_samples=1200, max_eval_samples=500, learning_rate=2e-4, max_length=48)
            for weights in ("none", "balanced")}
    test = [json.loads(line)["label"] for line in (data / "test.jsonl").read_text().splitlines()[:500]]
    majority_share = test.count("other") / len(test)
    majority_f1_macro = majority_share / (1 + majority_share)  # F1 of 'other' / 2; the rare class scores 0
    assert runs["balanced"]["test_f1_macro"] > runs["none"]["test_f1_macro"] + CLASS_WEIGHTS_MIN_GAIN, runs
    assert runs["balanced"]["test_f1_macro"] > majority_f1_macro + CLASS_WEIGHTS_MIN_GAIN, runs


# ------------------------------------------------------------------ --max_train_samples keeps the label set
@pytest.mark.parametrize("task", ["text-classification", "token-classification"])
def test_a_subset_without_a_label_still_trains_every_label(task, tiny_model, tmp_path):
    """The label set comes from the whole training split, then --max_train_samples picks rows:
    the first 12 rows lack 'rare' (in the training file further down, and in validation), and
    the run trains a model that knows every label, in the whole split's order."""
    if task == "token-classification":
        def row(tag):
            return {"tokens": ["the", "word", "here"], "tags": ["O", tag, "O"]}
        extra = {"task": task, "tokens_column": "tokens", "tags_column": "tags"}
        expected = ["B-common", "B-rare", "O"]
    else:
        def row(tag):
            return {"text": f"the word {tag}", "label": tag}
        extra = {}
        expected = ["common", "other", "rare"]
    common = [row("B-common" if task == "token-classification" else ("common", "other")[i % 2]) for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", common + [row("B-rare" if extra else "rare")] * 3)
    validation = write_jsonl(tmp_path / "validation.jsonl", [row("B-rare" if extra else "rare"), common[0]])
    out = tmp_path / "run"
    run_train(train_args(tiny_model, {"train": train, "validation": validation}, out, max_steps=1,
                         max_train_samples=12, per_device_train_batch_size=4, **extra))
    config = json.loads((out / "final" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(expected))] == expected
    assert json.loads((out / "config.yaml").read_text().split("max_train_samples: ")[1].split("\n")[0]) == 12
