"""Nothing silently wrong: every option, label and data file is checked before work (in
process, fast). The runs that need real processes are in tests/test_checks_integration.py."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from conftest import LABELS, minilm_path, write_jsonl
from fine_tune.core import data as D
from fine_tune.core.config import MATHS_FIELDS, ConfigError, parse_args
from fine_tune.core.errors import UserError


def splits_of(**columns_by_split) -> dict:
    from datasets import Dataset

    return {split: Dataset.from_list(rows) for split, rows in columns_by_split.items()}


def rows(labels, key="label"):
    return [{"text": f"text {i}", key: v} for i, v in enumerate(labels)]


# ------------------------------------------------------------------ labels
def test_labels_come_from_the_training_split_and_a_stray_label_is_named():
    cfg = parse_args([])
    splits = splits_of(train=rows(["positive", "negative", "positive"]),
                       validation=rows(["negative", "postive"]))
    with pytest.raises(UserError, match="validation data has label 'postive' in row 1, which the train data"):
        D.infer_labels(splits, cfg)
    # declared on purpose: the full set, in this order
    cfg = parse_args(["--label_names", "positive,negative,postive"])
    assert D.infer_labels(splits, cfg).names == ["positive", "negative", "postive"]


def test_integer_labels_one_to_five_are_five_classes():
    from transformers import AutoTokenizer

    cfg = parse_args(["--max_length", "16"])
    splits = splits_of(train=rows([1, 2, 3, 4, 5, 5]), validation=rows([5, 1]))
    info = D.infer_labels(splits, cfg)
    assert info.names == ["1", "2", "3", "4", "5"]  # no phantom class "0"
    tokenized = D.tokenize_splits(splits, AutoTokenizer.from_pretrained(minilm_path()), cfg, info)
    assert tokenized["train"]["labels"] == [0, 1, 2, 3, 4, 4]
    assert tokenized["validation"]["labels"] == [4, 0]


def test_token_labels_only_in_validation_are_an_error():
    cfg = parse_args(["--task", "token-classification"])
    train = [{"tokens": ["a", "b"], "tags": ["B-PER", "O"]}]
    splits = splits_of(train=train, validation=[{"tokens": ["c"], "tags": ["B-LOC"]}])
    with pytest.raises(UserError, match="validation data has label 'B-LOC'"):
        D.infer_labels(splits, cfg)


# ------------------------------------------------------------------ files
def test_conll_word_is_the_first_column_and_docstart_is_skipped():
    from fine_tune.core.conll import read_conll

    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n"
            "Peter NNP B-NP B-PER\n")
    assert read_conll(text) == [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
                                {"tokens": ["Peter"], "tags": ["B-PER"]}]


def test_file_suffixes_are_matched_case_insensitively(tmp_path):
    path = tmp_path / "train.TSV"
    path.write_text("text\tlabel\nhello, world\tpositive\nbad\tnegative\n")
    ds = D.load_local_file(str(path))
    assert ds.column_names == ["text", "label"] and ds[0]["text"] == "hello, world"


# ------------------------------------------------------------------ entity scoring
def random_tags(rng, scheme, n):
    prefixes = {"IOB1": "BI", "IOB2": "BI", "IOBES": "BIES", "BILOU": "BILU"}[scheme]
    return [rng.choice(["O"] * 3 + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC", "geo-loc")])
            for _ in range(n)]


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2", "IOBES"])
def test_entities_and_scores_match_seqeval(scheme):
    """seqeval's default mode is conlleval's chunking rules (IOB1, IOB2, IOBES)."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    from fine_tune.core.metrics import entity_metrics, extract_entities

    rng = random.Random(scheme)
    true = [random_tags(rng, scheme, rng.randint(1, 12)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else random_tags(rng, scheme, 1)[0] for t in row] for row in true]
    for row in true + pred:
        assert extract_entities(row) == {(t, s, e + 1) for t, s, e in get_entities(row)}, row
    ours = entity_metrics(pred, true)
    assert ours["precision"] == pytest.approx(precision_score(true, pred))
    assert ours["recall"] == pytest.approx(recall_score(true, pred))
    assert ours["f1"] == pytest.approx(f1_score(true, pred))


def test_bilou_is_iobes_with_other_letters_and_agrees_with_seqeval_strict():
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.metrics.v1 import Entities
    from seqeval.scheme import BILOU

    from fine_tune.core.metrics import extract_entities

    rng = random.Random(0)
    for _ in range(300):
        row = random_tags(rng, "BILOU", rng.randint(1, 12))
        as_iobes = [t.replace("L-", "E-", 1).replace("U-", "S-", 1) for t in row]
        assert extract_entities(row) == {(t, s, e + 1) for t, s, e in get_entities(as_iobes)}
    well_formed = ["U-PER", "O", "B-LOC", "I-LOC", "L-LOC", "B-PER", "L-PER", "U-LOC"]
    strict = {(e.tag, e.start, e.end) for e in Entities([well_formed], BILOU).entities[0]}
    assert extract_entities(well_formed) == strict == {("PER", 0, 1), ("LOC", 2, 5), ("PER", 5, 7), ("LOC", 7, 8)}


def test_conlleval_rules_on_hand_made_cases():
    from fine_tune.core.metrics import extract_entities

    cases = {  # conlleval: an I- that does not continue its type starts an entity (IOB1)
        ("I-PER", "I-PER", "B-PER", "I-LOC"): {("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4)},
        ("S-PER", "S-PER", "E-LOC"): {("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3)},
        ("PER", "PER", "O", "LOC", "PER"): {("PER", 0, 2), ("LOC", 3, 4), ("PER", 4, 5)},  # bare types (IO)
        ("B-geo-loc", "I-geo-loc", "O"): {("geo-loc", 0, 2)},
    }
    for tags, expected in cases.items():
        assert extract_entities(list(tags)) == expected, tags


# ------------------------------------------------------------------ metric names
def test_metric_functions_report_exactly_the_names_the_checks_use():
    import numpy as np

    from fine_tune.core import metrics as M
    from fine_tune.core.tasks import TASKS

    cls = M.classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    assert ["loss", *cls] == list(TASKS["text-classification"].metrics)
    reg = M.regression_metrics(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.6, 1.0]))
    assert ["loss", *reg] == list(TASKS["regression"].metrics)
    names = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    ner = M.entity_metrics([["B-PER", "O"]], [["B-PER", "O"]], names)
    assert sorted(["loss", *ner]) == sorted(TASKS["token-classification"].metric_names(names))  # f1_LOC too


def test_metric_for_best_model_is_checked_at_parse_time():
    with pytest.raises(ConfigError, match="--metric_for_best_model 'f1': the text-classification evaluation "
                                          "reports no such metric; choose from loss, accuracy"):
        parse_args(["--metric_for_best_model", "f1"])
    assert parse_args(["--metric_for_best_model", "eval_f1_macro"]).best_metric == "eval_f1_macro"
    cfg = parse_args(["--task", "token-classification", "--metric_for_best_model", "f1_PER"])
    cfg.check_metric_for_best_model(["B-PER", "O"])
    with pytest.raises(ConfigError, match="choose from loss, precision, recall, f1, accuracy, f1_LOC"):
        cfg.check_metric_for_best_model(["B-LOC", "O"])  # the data has no PER entities


def test_a_yaml_scalar_metric_is_one_name(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("metric: seqeval\n")
    cfg = parse_args(["--config", str(recipe), "--metric", "accuracy", "--trust_remote_code", "true"])
    assert cfg.metric == ["seqeval", "accuracy"]


# ------------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("flag,value,expect", [
    ("seed", "-1", "must be an integer in [0, 2**32)"),
    ("adam_beta1", "1.5", "must be in [0, 1)"),
    ("adam_beta2", "-0.1", "must be in [0, 1)"),
    ("adam_epsilon", "0", "must be > 0"),
    ("dataloader_num_workers", "-1", "must be an integer >= 0"),
    ("preprocessing_num_workers", "0", "must be an integer >= 1"),
    ("max_steps", "-5", "must be -1 (use --num_train_epochs) or >= 1"),
    ("learning_rate", "inf", "must be a finite number"),
    ("weight_decay", "nan", "must be a finite number"),
    ("ddp_timeout", "0", "must be >= 1 (seconds)"),
    ("peak_flops", "-1", "must be > 0"),
])
def test_numeric_options_are_range_checked(flag, value, expect):
    with pytest.raises(ConfigError) as e:
        parse_args([f"--{flag}", value])
    assert str(e.value).startswith(f"--{flag} ") and expect in str(e.value)


# ------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> Path:
    """A BERT with 64 positions (the tiny model of conftest has 128), MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("small_bert")
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def test_max_length_beyond_the_position_embeddings_is_refused(small_bert):
    from fine_tune.core.model import check_model_options

    check_model_options(parse_args(["--model_name_or_path", str(small_bert), "--max_length", "64"]))
    with pytest.raises(UserError, match="--max_length 65 is more than .* its position embeddings cover 64 tokens"):
        check_model_options(parse_args(["--model_name_or_path", str(small_bert), "--max_length", "65"]))


def test_overrides_that_change_a_weight_shape_are_refused(small_bert):
    from fine_tune.core.model import check_model_options

    ok = parse_args(["--model_name_or_path", str(small_bert), "--max_length", "32",
                     "--model_config_overrides", '{"hidden_dropout_prob": 0.0}'])
    check_model_options(ok)
    bad = parse_args(["--model_name_or_path", str(small_bert), "--max_length", "32",
                      "--model_config_overrides", '{"intermediate_size": 64}'])
    with pytest.raises(UserError, match="changes the shape of pre-trained weights .*intermediate"):
        check_model_options(bad)


# ------------------------------------------------------------------ resume compatibility
def test_resume_compares_every_maths_and_label_option():
    for name in ("tokenizer_name", "label_names", "text_column", "text_pair_column", "label_column",
                 "tokens_column", "tags_column", "validation_file", "validation_split_percentage",
                 "warmup_steps", "warmup_ratio", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"):
        assert name in MATHS_FIELDS, name


def test_resume_refuses_other_data_content(tmp_path):
    from fine_tune.core import checkpoint as C
    from fine_tune.core.config import save_config

    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows(LABELS)) for s in ("train", "validation")}
    cfg = parse_args(["--train_file", str(files["train"]), "--validation_file", str(files["validation"])])
    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    save_config(cfg, ckpt / "config.yaml")
    state = C.TrainState(global_step=4, data_fingerprint=D.data_fingerprint(cfg))
    (ckpt / C.STATE_FILE).write_text(json.dumps(state.state_dict()))
    C.check_compatible(ckpt, cfg, world_size=1)  # same files: fine
    write_jsonl(files["train"], rows(list(reversed(LABELS))))  # same size, other content
    with pytest.raises(UserError, match="the content of the training or validation data differs"):
        C.check_compatible(ckpt, cfg, world_size=1)


# ------------------------------------------------------------------ predict
def test_predict_reports_truncated_words_as_not_scored(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from fine_tune.commands import predict

    names = ["B-PER", "I-PER", "O"]  # id 0 is an entity tag
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, id2label=dict(enumerate(names)),
                        label2id={n: i for i, n in enumerate(names)})
    model = BertForTokenClassification(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    words = "one two three four five six seven eight nine ten".split()
    [pred] = predict.predict_batches([words], tokenizer, model, "token-classification", max_length=6)
    assert len(pred) == 10 and pred[4:] == [None] * 6 and None not in pred[:4]  # [CLS] + 4 words + [SEP]
    result = predict.score([pred], [["O"] * 10], "token-classification", dict(enumerate(names)))
    assert result["unscored_words"] == 6
    entities = predict.entities(words, predict.tag_names(pred, dict(enumerate(names))))
    assert all(e["end_word"] <= 4 for e in entities)


# ------------------------------------------------------------------ signals
def test_first_signal_says_so_in_one_line_and_a_second_ctrl_c_aborts(capfd):
    from fine_tune.core.signals import STOP_SIGNALS, StopSignal

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)  # a later request changes nothing
        assert stop.signum == signal.SIGTERM
        assert capfd.readouterr().err == \
            "stop requested (SIGTERM): checkpointing after this step; Ctrl-C again aborts\n"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    import subprocess
    import sys

    # the abort: in a child process, since it ends the process
    code = ("import os, signal, time\nfrom fine_tune.core.signals import install_stop_handlers\n"
            "install_stop_handlers()\nos.kill(os.getpid(), signal.SIGUSR1)\nos.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\nprint('not aborted')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 130 and "not aborted" not in proc.stdout
    assert proc.stderr.count("stop requested (SIGUSR1)") == 1


# ------------------------------------------------------------------ columns
COLUMN_OPTIONS = {
    # task: the column options it reads, and a row that has every default column
    "text-classification": (["text_column", "text_pair_column", "label_column"],
                            {"text": "a b", "pair": "c", "label": "x"}),
    "regression": (["text_column", "text_pair_column", "label_column"], {"text": "a b", "pair": "c", "label": 1.0}),
    "multi-label-classification": (["text_column", "text_pair_column", "label_column"],
                                   {"text": "a b", "pair": "c", "label": ["x"]}),
    "token-classification": (["tokens_column", "tags_column"], {"tokens": ["a"], "tags": ["O"]}),
}


@pytest.mark.parametrize("task", list(COLUMN_OPTIONS))
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_column_option_missing_in_any_split_is_one_line(task, split, tmp_path):
    """Each column option naming a column that one split lacks: a one-line error naming the
    option, the split and the columns it has, before labels or tokens are read."""
    options, row = COLUMN_OPTIONS[task]
    files = {}
    for name in ("train", "validation", "test"):
        files[name] = write_jsonl(tmp_path / f"{name}.jsonl", [row, row])
    base = ["--task", task, "--text_pair_column", "pair"] if task != "token-classification" else ["--task", task]
    for name in ("train", "validation", "test"):
        base += [f"--{name}_file", str(files[name])]
    D.load_raw_splits(parse_args(base))  # every column present: no error
    for option in options:
        other = dict(row)
        other.pop(row_key := {"text_column": "text", "text_pair_column": "pair", "label_column": "label",
                              "tokens_column": "tokens", "tags_column": "tags"}[option])
        write_jsonl(files[split], [other, other])
        with pytest.raises(UserError) as caught:
            D.load_raw_splits(parse_args(base))
        message = str(caught.value)
        assert "\n" not in message
        assert f"the {split} data has no column {row_key!r} (set by --{option})" in message
        assert "its columns are: " + ", ".join(other) in message
        write_jsonl(files[split], [row, row])
