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


def detect_task(config) -> str:
    if config.problem_type == "multi_label_classification":  # before num_labels: one label is possible
        return "multi-label-classification"
    if config.problem_type == "regression" or config.num_labels == 1:
        return "regression"
    if any(a.endswith("ForTokenClassification") for a in (config.architectures or [])):
        return "token-classification"
    return "text-classification"


def load(model_dir: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, \
        AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"--model {model_dir} holds no model (no config.json); give OUTPUT_DIR/final")
    config = AutoConfig.from_pretrained(path)
    task = detect_task(config)
    cls = AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path).eval()
    return AutoTokenizer.from_pretrained(path), model, task


def predict_batches(texts: list, tokenizer, model, task: str, batch_size: int = 64, max_length: int = 512):
    """Predictions for texts (strings, or word lists for token classification), in input order.

    Not ``transformers.pipeline`` (which final/ loads, as the tests show): --text and --file share
    this one batched path, predictions are per word for NER with the words past --max_length
    reported as not scored (the pipeline drops them silently), and multi-label gives every
    label's sigmoid score."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths together
    out: list = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [texts[i] for i in idx]
            enc = tokenizer(batch, is_split_into_words=task == "token-classification", truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**enc).logits.float()
            for row, i in enumerate(idx):
                if task == "regression":
                    out[i] = float(logits[row, 0])
                elif task == "token-classification":
                    word_ids = enc.word_ids(row)
                    pred, seen = [], set()
                    for pos, wid in enumerate(word_ids):
                        if wid is not None and wid not in seen:
                            seen.add(wid)
                            pred.append(int(logits[row, pos].argmax()))
                    # words cut off by truncation have no prediction: None, never a label id
                    # (id 0 can be an entity tag), and they are reported as not scored
                    out[i] = pred + [None] * (len(texts[i]) - len(pred))
                elif task == "multi-label-classification":
                    out[i] = logits[row].sigmoid().tolist()  # one independent score per label
                else:
                    probs = logits[row].softmax(-1)
                    out[i] = (int(probs.argmax()), float(probs.max()))
    return out


def label_set(scores: list[float], id2label: dict, threshold: float) -> dict:
    """The labels whose score reaches the threshold, best first, with their scores."""
    chosen = sorted((i for i, v in enumerate(scores) if v >= threshold), key=lambda i: -scores[i])
    return {id2label[i]: round(scores[i], 4) for i in chosen}


def entities(words: list[str], tags: list) -> list[dict]:
    """The entities of the predicted tags (None, a word not scored, ends an entity)."""
    from fine_tune.core.metrics import extract_entities

    tags = ["O" if t is None else t for t in tags]
    return [{"type": t, "text": " ".join(words[s:e]), "start_word": s, "end_word": e}
            for t, s, e in sorted(extract_entities(tags), key=lambda x: x[1])]


def tag_names(pred: list, id2label: dict) -> list:
    return [None if t is None else id2label[t] for t in pred]


def unscored(pred: list) -> int:
    """Words past --max_length: not seen by the model, so not scored."""
    return sum(t is None for t in pred)


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
        inputs = [t.split() for t in args.text] if task == "token-classification" else args.text
        for text, pred in zip(args.text, predict_batches(inputs, tokenizer, model, task, args.batch_size,
                                                          args.max_length)):
            if task == "regression":
                print(f"{pred:.3f}\t{text}")
            elif task == "token-classification":
                found = entities(text.split(), tag_names(pred, id2label))
                print(text)
                for ent in found:
                    print(f"  {ent['type']}: {ent['text']}")
                if not found:
                    print("  (no entities)")
                if unscored(pred):
                    print(f"  ({unscored(pred)} words past --max_length {args.max_length} not scored)")
            elif task == "multi-label-classification":
                chosen = label_set(pred, id2label, args.multilabel_threshold)
                best = max(range(len(pred)), key=lambda i: pred[i])
                shown = ", ".join(f"{k} {v:.3f}" for k, v in chosen.items()) or \
                    f"(none; highest {id2label[best]} {pred[best]:.3f})"
                print(f"{shown}\t{text}")
            else:
                print(f"{id2label[pred[0]]}\t{pred[1]:.3f}\t{text}")
        return {}

    ds = read_file(args.file)
    column = args.tokens_column if task == "token-classification" else args.text_column
    if column not in ds.column_names:
        raise UserError(f"{args.file} has no column {column!r}; its columns are: {', '.join(ds.column_names)}")
    inputs = ds[column]
    preds = predict_batches(inputs, tokenizer, model, task, args.batch_size, args.max_length)
    gold_column = args.tags_column if task == "token-classification" else args.label_column
    result = {}
    if gold_column in ds.column_names:
        result = score(preds, gold_labels(ds, args, task), task, id2label, args.multilabel_threshold)
    if args.output or not result:
        rows = []
        for i, pred in enumerate(preds):
            if task == "regression":
                rows.append({"prediction": pred})
            elif task == "token-classification":
                tags = tag_names(pred, id2label)  # null: a word past --max_length, not scored
                rows.append({"tags": tags, "entities": entities(inputs[i], tags), "unscored_words": unscored(pred)})
            elif task == "multi-label-classification":
                chosen = label_set(pred, id2label, args.multilabel_threshold)
                rows.append({"labels": list(chosen), "scores": {id2label[j]: round(v, 4) for j, v in enumerate(pred)}})
            else:
                rows.append({"label": id2label[pred[0]], "score": pred[1]})
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if args.output:
            Path(args.output).write_text(text)
            print(f"wrote {len(rows)} predictions to {args.output}")
        else:
            sys.stdout.write(text)
    return result


def gold_labels(ds, args, task: str) -> list:
    """The file's labels; multi-label: lists of names (CSV cells split at --label_separator)."""
    if task != "multi-label-classification":
        return ds[args.tags_column if task == "token-classification" else args.label_column]
    from types import SimpleNamespace

    from fine_tune.core.data import label_sets

    cfg = SimpleNamespace(label_column=args.label_column, label_separator=args.label_separator)
    return label_sets(ds, cfg, "--file", source=args.file)


def score(preds, gold, task: str, id2label: dict, threshold: float = 0.5) -> dict:
    import numpy as np

    from fine_tune.core import metrics as M

    label2id = {v: k for k, v in id2label.items()}
    if task == "regression":
        result = M.regression_metrics(np.array(preds), np.array(gold, dtype=float))
    elif task == "token-classification":
        true = [[t if isinstance(t, str) else id2label[int(t)] for t in row] for row in gold]
        # only the words the model saw are scored; the others are counted and reported
        scored = [len(p) - unscored(p) for p in preds]
        result = M.entity_metrics([tag_names(p[:n], id2label) for p, n in zip(preds, scored)],
                                  [g[:n] for g, n in zip(true, scored)])
        result["unscored_words"] = sum(unscored(p) for p in preds)
        if result["unscored_words"]:
            print(f"{result['unscored_words']} words past --max_length were not scored (truncated)", file=sys.stderr)
    elif task == "multi-label-classification":
        names = [id2label[i] for i in range(len(id2label))]
        unknown = next((n for row in gold for n in row if n not in label2id), None)
        if unknown is not None:
            raise UserError(f"label {unknown!r} is not one of the model's labels: {', '.join(names)}")
        y = np.array([[n in row for n in names] for row in gold], dtype=int)
        result = M.multilabel_metrics(np.array(preds), y, names, threshold)
    else:
        try:
            y = np.array([label2id[g] if isinstance(g, str) else int(g) for g in gold])
        except KeyError as e:
            raise UserError(f"label {e.args[0]!r} is not one of the model's labels: {', '.join(label2id)}") from None
        p = np.array([p[0] for p in preds])
        result = M.classification_metrics(p, y, len(id2label))
        print(M.confusion(p, y, [id2label[i] for i in range(len(id2label))]))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
