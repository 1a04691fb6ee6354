"""explore: its numbers equal a direct computation on small known data sets, its tokenization
matches the tokenizer, its plots are real images, and bad input is one line, not a traceback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_jsonl

# 10 train rows: 5 x "a", 3 x "b", 2 x "c"; texts of very different lengths
TRAIN = [
    ("good", "a"), ("a fine movie indeed", "a"), ("great " * 30, "a"), ("the plot was okay", "a"),
    ("lovely music and a very good cast of actors in every single scene of it", "a"),
    ("bad", "b"), ("awful " * 12, "b"), ("terrible film", "b"),
    ("boring", "c"), ("not quite the film it wanted to be, sadly " * 2, "c"),
]
VALIDATION = [("good film", "a"), ("bad plot", "b"), ("awful acting", "b"), ("boring boring boring", "c")]


def run_explore(capsys, *args) -> str:
    from fine_tune.commands.explore import main

    main([str(a) for a in args])
    return capsys.readouterr().out


@pytest.fixture
def files(tmp_path):
    return {"train": write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": l} for t, l in TRAIN]),
            "validation": write_jsonl(tmp_path / "validation.jsonl", [{"text": t, "label": l} for t, l in VALIDATION])}


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def image_stats(path):
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # a complete, valid PNG
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    non_white = float((pixels.sum(axis=2) < 3 * 235).mean())
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    return pixels.shape, non_white, colours


def test_classification_facts_equal_a_direct_computation(tiny_model, files, tmp_path, capsys):
    out = run_explore(capsys, "--model_name_or_path", tiny_model, "--train_file", files["train"],
                      "--validation_file", files["validation"], "--max_length", 16, "--json",
                      "--show_tokens", "Hello, how are you?", "--plots", tmp_path / "plots", "--examples", 1)
    facts = json.loads(out)
    assert facts["splits"] == {"train": 10, "validation": 4}

    labels = facts["labels"]
    assert labels["counts"] == {"train": {"a": 5, "b": 3, "c": 2}, "validation": {"a": 1, "b": 2, "c": 1}}
    assert labels["shares"]["train"] == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2})
    assert labels["imbalance_ratio"] == pytest.approx(5 / 2)
    assert (labels["majority_label"], labels["minority_label"]) == ("a", "c")
    # always "a" (train's majority): right on 5/10 train and 1/4 validation rows
    assert labels["majority_baseline_accuracy"] == pytest.approx({"train": 0.5, "validation": 0.25})
    assert labels["examples"] == {"a": ["good"], "b": ["bad"], "c": ["boring"]}

    tok = tokenizer_of(tiny_model)
    for split, rows in (("train", TRAIN), ("validation", VALIDATION)):
        lengths = np.array([len(tok(t)["input_ids"]) for t, _ in rows])
        stats = facts["token_lengths"]["splits"][split]
        assert stats["min"] == lengths.min() and stats["max"] == lengths.max()
        assert stats["median"] == pytest.approx(np.median(lengths))
        assert stats["mean"] == pytest.approx(lengths.mean())
        for p in (90, 95, 99):
            assert stats[f"p{p}"] == pytest.approx(np.percentile(lengths, p))
        assert stats["truncated"] == int((lengths > 16).sum())
        assert stats["truncated_share"] == pytest.approx((lengths > 16).mean())
    train_lengths = np.array([len(tok(t)["input_ids"]) for t, _ in TRAIN])
    assert facts["token_lengths"]["splits"]["train"]["truncated"] == 3  # the three long texts
    p99 = np.percentile(train_lengths, 99)
    recommended = facts["token_lengths"]["recommended_max_length"]
    assert recommended == math.ceil(p99 / 8) * 8 and recommended % 8 == 0 and recommended >= p99
    assert facts["token_lengths"]["max_length"] == 16

    # the tutorial's example: BERT's uncased vocabulary gives the same ids
    t = facts["tokenization"]
    assert t["tokens"] == ["[CLS]", "hello", ",", "how", "are", "you", "?", "[SEP]"]
    assert t["ids"] == [101, 7592, 1010, 2129, 2024, 2017, 1029, 102]
    assert t["special_tokens_in_text"] == ["[CLS]", "[SEP]"]
    assert t["decoded_without_special_tokens"] == "hello, how are you?"
    assert t["decoded"] == "[CLS] hello, how are you? [SEP]"
    assert t["round_trip"].startswith("same up to case")

    plots = sorted(facts["plots"])
    assert [p.rsplit("/", 1)[-1] for p in plots] == ["label_distribution.png", "token_lengths.png"]
    for path in plots:
        shape, non_white, colours = image_stats(path)
        assert shape[0] >= 300 and shape[1] >= 500
        assert non_white > 0.03 and colours > 50  # bars/histogram drawn, not a blank canvas


def test_terminal_output_shows_the_same_numbers(tiny_model, files, capsys):
    out = run_explore(capsys, "--model_name_or_path", tiny_model, "--train_file", files["train"],
                      "--validation_file", files["validation"], "--max_length", 16)
    assert "imbalance ratio (train, majority/minority): 2.50 ('a' / 'c')" in out
    assert "accuracy 0.5000 on train, 0.2500 on validation" in out
    assert "> --max_length 16" in out and "3 (30.0%)" in out
    tok = tokenizer_of(tiny_model)
    p99 = np.percentile([len(tok(t)["input_ids"]) for t, _ in TRAIN], 99)
    assert f"recommended --max_length: {math.ceil(p99 / 8) * 8} " in out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("a "))
    assert row.split() == ["a", "5", "(50.0%)", "1", "(25.0%)"]


def test_regression_label_statistics_and_mean_baseline(tiny_model, tmp_path, capsys):
    train = [{"text": f"text {i}", "score": v} for i, v in enumerate([0.5, 1.5, 2.0, 4.0, -1.0])]
    validation = [{"text": "x", "score": 1.0}, {"text": "y", "score": 3.0}]
    files = [write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "validation.jsonl", validation)]
    facts = json.loads(run_explore(capsys, "--model_name_or_path", tiny_model, "--task", "regression",
                                   "--label_column", "score", "--train_file", files[0],
                                   "--validation_file", files[1], "--json", "--plots", tmp_path / "plots"))
    y = np.array([r["score"] for r in train])
    stats = facts["labels"]["stats"]["train"]
    assert stats["mean"] == pytest.approx(y.mean()) and stats["std"] == pytest.approx(y.std())
    assert stats["median"] == pytest.approx(1.5) and (stats["min"], stats["max"]) == (-1.0, 4.0)
    base = facts["labels"]["mean_baseline"]
    assert base["prediction"] == pytest.approx(1.4)
    assert base["mse"]["validation"] == pytest.approx(((np.array([1.0, 3.0]) - 1.4) ** 2).mean())
    for path in facts["plots"]:
        _, non_white, colours = image_stats(path)
        assert non_white > 0.02 and colours > 20


def test_token_classification_tags_entities_and_words(tiny_model, tmp_path, capsys):
    rows = [
        {"tokens": ["John", "lives", "in", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": ["hello", "there"], "tags": ["O", "O"]},
        {"tokens": ["Mary", "and", "Ann", "met"], "tags": ["B-PER", "O", "B-PER", "O"]},
    ]
    path = write_jsonl(tmp_path / "ner.jsonl", rows)
    facts = json.loads(run_explore(capsys, "--model_name_or_path", tiny_model, "--task", "token-classification",
                                   "--train_file", path, "--validation_split_percentage", 0, "--json"))
    labels = facts["labels"]
    assert labels["counts"]["train"] == {"B-LOC": 1, "B-PER": 3, "I-LOC": 1, "O": 6}
    assert labels["entities"]["train"] == {"PER": 3, "LOC": 1}
    assert labels["sentences_without_entities"]["train"] == pytest.approx(1 / 3)
    assert labels["majority_baseline_accuracy"]["train"] == pytest.approx(6 / 11)
    words = labels["words_per_sentence"]["train"]
    assert (words["min"], words["median"], words["max"]) == (2, 4.0, 5)
    tok = tokenizer_of(tiny_model)
    lengths = [len(tok(r["tokens"], is_split_into_words=True)["input_ids"]) for r in rows]
    assert facts["token_lengths"]["splits"]["train"]["max"] == max(lengths)
    assert facts["token_lengths"]["splits"]["train"]["median"] == pytest.approx(np.median(lengths))


def test_bad_input_is_one_line_and_exit_2(tiny_model, files, capsys):
    from fine_tune.commands.explore import main

    with pytest.raises(SystemExit) as e:
        main(["--model_name_or_path", str(tiny_model), "--train_file", str(files["train"]),
              "--text_column", "review"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no column 'review'" in err and "text, label" in err
    with pytest.raises(SystemExit):
        main(["--train_file", str(files["train"]), "--split", "tset"])
    assert "--split 'tset'" in capsys.readouterr().err
