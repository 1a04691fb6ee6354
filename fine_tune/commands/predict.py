"""Score or label data with a fine-tuned model (``OUTPUT_DIR/final``).

    fine-tune predict --model runs/sentiment/final --file data/sentiment/test.jsonl
    fine-tune predict --model runs/sentiment/final --text "What a lovely day"
    fine-tune predict --model runs/ner/final --text "Pizza at Joe's in Brooklyn"

A file with a label column is scored (metrics and a confusion matrix); a file without one is
labelled (``--output preds.jsonl``, else printed). The task (text classification, multi-label
classification, token classification or regression) is read from the model's config. A
multi-label model prints each text's label set with the scores (sigmoid, one per label;
``--multilabel_threshold`` picks the labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fine_tune.core.config import main_guard
from fine_tune.core.errors import UserError
from fine_tune.core.tasks import as_task, entities, label_set, tag_names, task_of_model, unscored  # noqa: F401


def load(model_dir: str):
    """(tokenizer, model, task) of a saved model; the task is read from its config."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"--model {model_dir} holds no model (no config.json); give OUTPUT_DIR/final")
    config = AutoConfig.from_pretrained(path)
    task = task_of_model(config)
    model = task.model_class().from_pretrained(path).eval()
    return AutoTokenizer.from_pretrained(path), model, task


def predict_batches(texts: list, tokenizer, model, task, batch_size: int = 64, max_length: int = 512):
    """Predictions for texts (strings, or word lists for token classification), in input order;
    ``task``: the model's task (or its name).

    Not ``transformers.pipeline`` (which final/ loads, as the tests show): --text and --file share
    this one batched path, predictions are per word for NER with the words past --max_length
    reported as not scored (the pipeline drops them silently), and multi-label gives every
    label's sigmoid score."""
    import torch

    task = as_task(task)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths together
    out: list = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [texts[i] for i in idx]
            enc = tokenizer(batch, is_split_into_words=task.split_into_words, truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**enc).logits.float()
            for row, i in enumerate(idx):
                out[i] = task.prediction(logits, enc, row, texts[i])
    return out


def read_file(path: str):
    from fine_tune.core.data import load_local_file

    return load_local_file(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fine-tune predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder written by train.py (OUTPUT_DIR/final)")
    p.add_argument("--file", help="csv/json/jsonl/parquet to score (with labels) or label (without)")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--tokens_column", default="tokens")
    p.add_argument("--tags_column", default="tags")
    p.add_argument("--output", help="write predictions here (jsonl)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--multilabel_threshold", type=float, default=0.5,
                   help="multi-label: predict a label when its score is at least this (default: 0.5)")
    p.add_argument("--label_separator", default=",", help="multi-label: separator of label names in a CSV cell")
    return p


@main_guard
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not 0 < args.multilabel_threshold < 1:
        raise UserError(f"--multilabel_threshold {args.multilabel_threshold} is not allowed: must be in (0, 1)")
    if not args.file and not args.text:
        raise UserError("give --file PATH or --text 'some text'")
    tokenizer, model, task = load(args.model)
    id2label = {int(k): v for k, v in model.config.id2label.items()}

    if args.text:
        inputs = [task.text_input(t) for t in args.text]
        for text, pred in zip(args.text, predict_batches(inputs, tokenizer, model, task, args.batch_size,
                                                          args.max_length)):
            print(task.show(text, pred, id2label, args))
        return {}

    ds = read_file(args.file)
    column = task.input_column(args)
    if column not in ds.column_names:
        raise UserError(f"{args.file} has no column {column!r}; its columns are: {', '.join(ds.column_names)}")
    inputs = ds[column]
    preds = predict_batches(inputs, tokenizer, model, task, args.batch_size, args.max_length)
    result = {}
    if task.label_column_name(args) in ds.column_names:
        result = score(preds, gold_labels(ds, args, task), task, id2label, args.multilabel_threshold)
    if args.output or not result:
        rows = [task.record(pred, inputs[i], id2label, args) for i, pred in enumerate(preds)]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if args.output:
            Path(args.output).write_text(text)
            print(f"wrote {len(rows)} predictions to {args.output}")
        else:
            sys.stdout.write(text)
    return result


def gold_labels(ds, args, task) -> list:
    """The file's labels; multi-label: lists of names (CSV cells split at --label_separator)."""
    return as_task(task).gold_labels(ds, args)


def score(preds, gold, task, id2label: dict, threshold: float = 0.5) -> dict:
    """The task's metrics of the predictions against the file's labels, printed as JSON."""
    result = as_task(task).score(preds, gold, id2label, threshold)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
