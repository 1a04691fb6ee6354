"""More tasks through the same loop: token classification (NER) and regression.

Token losses are where normalisation goes most wrong: micro-batches and ranks hold very
different numbers of labelled tokens, so the step's loss must be the mean over all of them.
"""

import json
import random
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, load_weights, minilm_path, read_metrics, relative_difference, run_recipe, \
    run_train, train_args

TAGS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
NAMES = ["alice", "bob smith", "charlotte", "dmitri ivanov"]
PLACES = ["paris", "new york", "tokyo", "rio de janeiro"]
FILLER = "the a went to saw met in at with from yesterday today and then lovely city people".split()


def ner_rows(n: int, seed: int) -> list[dict]:
    """Sentences of 2 to 45 words (very different numbers of labelled tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.choice([1, 2, 3, 12, 20, 30])):
            r = rng.random()
            if r < 0.15:
                words = rng.choice(NAMES).split()
                tokens += words
                tags += ["B-PER"] + ["I-PER"] * (len(words) - 1)
            elif r < 0.3:
                words = rng.choice(PLACES).split()
                tokens += words
                tags += ["B-LOC"] + ["I-LOC"] * (len(words) - 1)
            else:
                tokens.append(rng.choice(FILLER)), tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    tmp = tmp_path_factory.mktemp("ner")
    model = tmp / "tiny_ner"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=len(TAGS),
                        id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    BertForTokenClassification(config).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model)
    files = {}
    for split, n, seed in (("train", 45, 1), ("validation", 21, 2)):
        files[split] = tmp / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in ner_rows(n, seed)))
    return {"tmp": tmp, "model": model, "files": files}


def test_label_alignment_first_subtoken_and_special_tokens():
    from transformers import AutoTokenizer

    from fine_tune.core.data import IGNORE_INDEX, align_labels

    tok = AutoTokenizer.from_pretrained(minilm_path())
    words, labels = ["Zyxwvut", "lives", "in", "Kraków"], [1, 4, 4, 0]
    enc = tok(words, is_split_into_words=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    n_first = enc.word_ids().count(0)
    assert n_first > 1  # the made-up name splits into several sub-tokens
    got = align_labels(enc.word_ids(), labels, label_all_tokens=False)
    assert got[0] == got[-1] == IGNORE_INDEX
    assert got[1:1 + n_first] == [1] + [IGNORE_INDEX] * (n_first - 1)
    assert [x for x in got if x != IGNORE_INDEX] == labels  # one label per word
    every = align_labels(enc.word_ids(), labels, label_all_tokens=True)
    assert every[1:1 + n_first] == [1] * n_first
    # truncation: words past max_length lose their labels, none is shifted
    short = tok(words, is_split_into_words=True, truncation=True, max_length=n_first + 3)
    cut = align_labels(short.word_ids(), labels, label_all_tokens=False)
    assert [x for x in cut if x != IGNORE_INDEX] == labels[:2]


def ner_args(ner, out, **kw):
    opts = dict(task="token-classification", max_steps=6, tokens_column="tokens", tags_column="tags",
                metric_for_best_model="f1")
    opts.update(kw)
    return train_args(ner["model"], ner["files"], out, **opts)


def test_token_level_equivalence(ner):
    """1 process batch 8 == 1 process 4 x 2 == 2 processes batch 4, to float32 reordering."""
    runs = {}
    for name, config, nproc, bs, acc in (("b8", None, None, 8, 1), ("4x2", None, None, 4, 2),
                                         ("2proc", "cpu_ddp.yaml", 2, 4, 1)):
        out = ner["tmp"] / f"eq_{name}"
        # lr 3e-3: one float32 ulp of a weight near 1 is then well under the tolerance (see test_topologies)
        run_train(ner_args(ner, out, per_device_train_batch_size=bs, gradient_accumulation_steps=acc,
                           learning_rate=3e-3), config, nproc)
        runs[name] = load_weights(out / "final")
        runs[name + "_loss"] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    init = load_weights(ner["model"])
    for name in ("4x2", "2proc"):
        assert relative_difference(runs[name], runs["b8"], init) < 1e-4, name
        assert runs[name + "_loss"] == pytest.approx(runs["b8_loss"], rel=1e-4)


def test_ner_two_process_eval_equals_one_process(ner):
    evals = []
    for config, nproc in ((None, None), ("cpu_ddp.yaml", 2)):
        out = ner["tmp"] / f"eval_{nproc}"
        run_train(ner_args(ner, out, max_steps=1, learning_rate=1e-12, per_device_eval_batch_size=4), config, nproc)
        evals.append([r for r in read_metrics(out) if "eval_loss" in r][-1])
    assert evals[0]["eval_samples"] == evals[1]["eval_samples"] == 21
    for key in ("eval_loss", "eval_f1", "eval_precision", "eval_recall", "eval_accuracy"):
        assert evals[1][key] == pytest.approx(evals[0][key], rel=1e-6), key


def test_conll_text_file_and_predict_entities(ner):
    conll = ner["tmp"] / "train.conll"
    lines = []
    for row in ner_rows(40, seed=5):
        lines += [f"{w} {t}" for w, t in zip(row["tokens"], row["tags"])] + [""]
    conll.write_text("\n".join(lines))
    out = ner["tmp"] / "conll"
    run_train(train_args(ner["model"], {"train": conll, "validation": conll}, out, task="token-classification",
                         max_steps=40, learning_rate=5e-3, per_device_train_batch_size=8))
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy", "eval_f1_PER", "eval_f1_LOC"} <= set(results)
    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.predict", "--model", str(out / "final"),
                           "--text", "yesterday alice went to tokyo"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("yesterday alice went to tokyo\n")


def test_real_ner_beats_all_o(tmp_path):
    """WNUT-2016 tweets with MiniLM: all-O tagging has entity F1 0."""
    from fine_tune.commands.prepare_data import prepare_ner

    data = prepare_ner(ROOT / "data")
    # 2 epochs of 1,200 tweets at learning rate 2e-4 (measured F1 0.18, precision 0.24); no
    # checkpoints, one validation at the end. 1,000 tweets reached F1 0.144 with seed 42 but ended
    # all-O (F1 0) with seed 7, and 800 at 3e-4 ended all-O too: fewer rows are not reliable here
    results = run_recipe("ner.yaml", data, tmp_path / "wnut", num_train_epochs=2, learning_rate=2e-4,
                         max_train_samples=1200, save_strategy="no", eval_strategy="no")
    assert results["test_f1"] > 0.05 and results["test_precision"] > 0.1
    assert results["test_samples"] == 239


def test_real_regression_beats_the_mean(tmp_path):
    import numpy as np

    from fine_tune.commands.prepare_data import prepare_sentiment

    data = prepare_sentiment(ROOT / "data")
    # one epoch at twice the recipe's learning rate, max length 48 (the train p95 is 45 tokens), no
    # checkpoints. Measured on the first 300 test sentences: MSE 1.56 (seed 42) and 1.40 (seed 7),
    # 0.59 and 0.53 of the train mean's 2.64; Pearson 0.704 and 0.702
    results = run_recipe("regression.yaml", data, tmp_path / "reg", max_train_samples=600, max_eval_samples=300,
                         num_train_epochs=1, per_device_train_batch_size=16, learning_rate=2e-4, max_length=48,
                         save_strategy="no")
    train_mean = np.mean([json.loads(x)["rating"] for x in (data / "train.jsonl").read_text().splitlines()[:600]])
    test = np.array([json.loads(x)["rating"] for x in (data / "test.jsonl").read_text().splitlines()[:300]])
    baseline = float(np.mean((test - train_mean) ** 2))
    assert results["test_mse"] < 0.8 * baseline, (results["test_mse"], baseline)
    assert results["test_pearson"] > 0.3
