"""Bad input gets a clear one-paragraph error, exit status 2, no traceback, and loses nothing:
each bad command runs against the folder of a finished run with --overwrite_output_dir, and
that folder must be byte-for-byte unchanged afterwards. The option parsing itself is tested in
process in tests/unit/test_config.py."""

import hashlib
from pathlib import Path

import pytest

from conftest import make_rows, run_train, small_files, train_args, write_jsonl
from fine_tune.core.config import parse_args


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    files = small_files(tmp, 20, 9)
    out = tmp / "run"
    run_train(train_args(tiny_model, files, out, max_steps=2, save_strategy="steps", save_steps=1))
    return {"tmp": tmp, "files": files, "out": out}


def expect_failure(finished_run, tiny_model, expect: str, files=None, accelerate_config=None, nproc=None, **flags):
    out = finished_run["out"]
    before = snapshot(out)
    flags.setdefault("overwrite_output_dir", "true")
    args = train_args(flags.pop("model", tiny_model), files or finished_run["files"], out, max_steps=2, **flags)
    proc = run_train(args, accelerate_config, nproc, check=False)
    assert proc.returncode != 0
    if accelerate_config is None:
        assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error and expect in error[0], proc.stderr[-3000:]
    # no traceback from our code (under `accelerate launch` the launcher prints its own)
    assert "Traceback" not in proc.stderr if accelerate_config is None else "fine_tune/" not in proc.stderr
    assert snapshot(out) == before, "the failed run changed the output directory"
    return error[0]


def test_unknown_option_names_the_closest(finished_run, tiny_model):
    msg = expect_failure(finished_run, tiny_model, "unknown option --learnig_rate", learnig_rate=1e-3)
    assert "did you mean --learning_rate?" in msg


def test_wrong_type_and_out_of_range_values(finished_run, tiny_model):
    expect_failure(finished_run, tiny_model, "--per_device_train_batch_size 'four' is not allowed: expected an integer",
          per_device_train_batch_size="four")
    expect_failure(finished_run, tiny_model, "--learning_rate -0.1 is not allowed: must be > 0", learning_rate=-0.1)
    expect_failure(finished_run, tiny_model, "--gradient_accumulation_steps 0 is not allowed", gradient_accumulation_steps=0)
    msg = expect_failure(finished_run, tiny_model, "--lr_scheduler_type 'cosin' is not allowed", lr_scheduler_type="cosin")
    assert "did you mean 'cosine'" in msg


def test_missing_data_file(finished_run, tiny_model):
    files = {**finished_run["files"], "train": finished_run["tmp"] / "nope.jsonl"}
    expect_failure(finished_run, tiny_model, "nope.jsonl does not exist", files=files)


def test_malformed_json_and_csv_name_the_line(finished_run, tiny_model):
    bad = finished_run["tmp"] / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken", "label": \n')
    expect_failure(finished_run, tiny_model, "is not valid JSON: line 2", files={**finished_run["files"], "train": bad})
    bad_csv = finished_run["tmp"] / "bad.csv"
    bad_csv.write_text('text,label\n"fine",positive\n"a","b","c","d"\n')
    msg = expect_failure(finished_run, tiny_model, "is not valid CSV", files={**finished_run["files"], "train": bad_csv})
    assert "line 3" in msg


def test_missing_column_lists_the_columns(finished_run, tiny_model):
    msg = expect_failure(finished_run, tiny_model, "has no column 'review'", text_column="review")
    assert "its columns are: text, label" in msg
    # the label column too (it once ended in a datasets traceback); every option and split: unit/test_checks.py
    msg = expect_failure(finished_run, tiny_model, "the train data has no column 'stars' (set by --label_column)",
                         label_column="stars")
    assert "its columns are: text, label" in msg


def test_empty_nan_and_out_of_range_labels(finished_run, tiny_model):
    tmp = finished_run["tmp"]
    empty = write_jsonl(tmp / "empty_label.jsonl", make_rows(5) + [{"text": "x", "label": ""}])
    expect_failure(finished_run, tiny_model, "empty or NaN label in row 5", files={**finished_run["files"], "train": empty})
    nan = tmp / "nan_label.csv"
    nan.write_text("text,label\ngood,1\nbad,0\nhuh,\n")
    expect_failure(finished_run, tiny_model, "empty or NaN label in row 2",
          files={"train": nan, "validation": nan})
    neg = write_jsonl(tmp / "neg_label.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": -1}])
    expect_failure(finished_run, tiny_model, "label -1 in column 'label' is negative", files={"train": neg, "validation": neg})


def test_split_with_no_rows(finished_run, tiny_model):
    empty = finished_run["tmp"] / "empty.jsonl"
    empty.write_text("")
    expect_failure(finished_run, tiny_model, "empty.jsonl has no rows",
                   files={**finished_run["files"], "validation": empty})


def test_model_path_missing_or_not_a_model(finished_run, tiny_model):
    expect_failure(finished_run, tiny_model, "model path ./no/such/model does not exist", model="./no/such/model")
    expect_failure(finished_run, tiny_model, "holds no model (no config.json)", model=finished_run["tmp"])


def test_resume_from_something_that_is_not_a_checkpoint(finished_run, tiny_model):
    expect_failure(finished_run, tiny_model, "is not a checkpoint", resume_from_checkpoint=finished_run["tmp"])
    # a corrupt checkpoint: copy a real one and truncate its weights
    import shutil

    real = sorted((finished_run["out"] / "checkpoints").glob("step_*"))[-1]
    broken = finished_run["tmp"] / "broken_ckpt"
    shutil.copytree(real, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 10)
    expect_failure(finished_run, tiny_model, "is corrupt (model.safetensors has 10 bytes", resume_from_checkpoint=broken,
          overwrite_output_dir="false")


def test_output_dir_of_another_run_is_refused(finished_run, tiny_model):
    out = finished_run["out"]
    before = snapshot(out)
    proc = run_train(train_args(tiny_model, finished_run["files"], out, max_steps=2), check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert snapshot(out) == before


def test_more_processes_than_examples(finished_run, tiny_model):
    two = write_jsonl(finished_run["tmp"] / "two.jsonl", make_rows(2))
    expect_failure(finished_run, tiny_model, "2 training examples cannot feed 3 processes",
          files={"train": two, "validation": two}, accelerate_config="cpu_ddp.yaml", nproc=3)


def test_tokenizer_without_pad_token_is_fixed(tiny_model, data_files, tmp_path):
    """GPT-style tokenizers have no pad token: we pad with EOS (or UNK), and training runs."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "nopad"
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = None
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    from fine_tune.core.model import load_tokenizer

    assert load_tokenizer(parse_args(["--model_name_or_path", str(model)])).pad_token == "[UNK]"
    run_train(train_args(model, data_files, tmp_path / "out", max_steps=2))
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_label_names_reject_unknown_labels(finished_run, tiny_model):
    expect_failure(finished_run, tiny_model, "which is not in --label_names (negative, positive)",
          label_names="negative,positive")
