"""Look at the data before training: splits, labels, token lengths, tokenization.

    fine-tune explore --train_file data/sentiment/train.jsonl \\
        --validation_file data/sentiment/validation.jsonl --test_file data/sentiment/test.jsonl \\
        --show_tokens "Hello, how are you?" --plots plots/

Takes the data flags of ``train.py`` (hub name or local files, column names, task, model
for the tokenizer, ``--max_length``; or ``--config RECIPE.yaml``) and loads the data the
way training does. Prints:

* examples per split, and a few examples of each label;
* the label distribution per split (counts, shares), the imbalance ratio (majority /
  minority count in train) and the majority-class baseline (always predicting train's most
  frequent label) that a model has to beat; regression: label statistics and the MSE of
  predicting train's mean; token classification: tag and entity counts, words per sentence;
  multi-label: examples per label, label-set sizes, and the all-negative and most-frequent-set
  baselines;
* when the training split is imbalanced (majority/minority count >= 3, or for multi-label a
  label on fewer than a quarter of the examples), a recommendation of ``--class_weights
  balanced`` with the weights it would use;
* token lengths under the tokenizer, special tokens included (min, median, mean, p90, p95,
  p99, max; percentiles interpolate linearly, as numpy's default), the share of examples
  that ``--max_length`` truncates, and a recommended ``--max_length``: the train p99
  rounded up to a multiple of 8 (capped at what the model accepts);
* ``--show_tokens TEXT``: tokens, ids, special tokens and the decoded round trip.

``--plots DIR`` writes ``label_distribution.png`` and ``token_lengths.png``; ``--json``
prints the same facts as one JSON object. This module gathers the facts; explore_report
prints them and explore_plots draws them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from typing import Optional

from fine_tune.commands.explore_plots import write_plots
from fine_tune.commands.explore_report import public, render
from fine_tune.core.config import ConfigError, TrainConfig, config_from_dict, load_yaml, main_guard
from fine_tune.core.errors import UserError

# TrainConfig options that explore takes (same names and meaning as in train.py)
DATA_OPTIONS = (
    "model_name_or_path", "tokenizer_name", "task", "dataset_name", "dataset_config_name", "train_file",
    "validation_file", "test_file", "text_column", "text_pair_column", "label_column", "tokens_column",
    "tags_column", "validation_split_percentage", "max_train_samples", "max_eval_samples", "max_length", "seed",
    "label_separator",
)
IMBALANCE_RATIO = 3.0  # majority/minority at which explore recommends --class_weights balanced
PERCENTILES = (90, 95, 99)


# ------------------------------------------------------------------ options
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fine-tune explore", allow_abbrev=False,
        description="Explore a data set before fine-tuning: splits, label distribution and baseline, token "
                    "lengths and a recommended --max_length, what tokenization does to a text. Takes the data "
                    "flags of train.py.")
    parser.add_argument("--config", help="YAML recipe of train.py; its data options are used, flags override")
    group = parser.add_argument_group("data (as in train.py)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in DATA_OPTIONS:
        meta = fields[name].metadata
        kw = {"help": f"{meta['help']} (default: {fields[name].default})", "default": argparse.SUPPRESS}
        if "choices" in meta:
            kw["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        group.add_argument(f"--{name}", dest=name, **kw)
    out = parser.add_argument_group("explore")
    out.add_argument("--split", help="look at this split only (default: every split)")
    out.add_argument("--examples", type=int, default=2, metavar="N", help="examples shown per label (default: 2)")
    out.add_argument("--show_tokens", metavar="TEXT", help="show how the tokenizer splits TEXT")
    out.add_argument("--plots", metavar="DIR", help="write label_distribution.png and token_lengths.png here")
    out.add_argument("--json", action="store_true", help="print the facts as JSON instead of tables")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = build_parser()

    def error(message):
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in DATA_OPTIONS})
    cfg = config_from_dict(values, source=args.config or "")
    if args.examples < 0:
        raise ConfigError(f"--examples {args.examples} is not allowed: must be >= 0")
    return cfg, args


# ------------------------------------------------------------------ numbers
def length_stats(lengths) -> dict:
    """min, median, mean, p90, p95, p99, max of a list of lengths (numpy's linear percentiles)."""
    import numpy as np

    arr = np.asarray(lengths, dtype=float)
    if arr.size == 0:
        return {"count": 0}
    out = {"count": int(arr.size), "min": int(arr.min()), "median": float(np.median(arr)),
           "mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = int(arr.max())
    return out


def recommend_max_length(p99: float, model_max: Optional[int]) -> int:
    """Smallest multiple of 8 that covers p99 (at least 8), capped at the model's limit."""
    value = max(8, int(math.ceil(p99 / 8.0)) * 8)
    if model_max:
        value = min(value, model_max)
    return value


def model_max_length(tokenizer) -> Optional[int]:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if value and value < 1_000_000 else None  # huge sentinel: unknown


def _shares(counts: dict) -> dict:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def _display_label(value, names: list[str]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value)


# ------------------------------------------------------------------ tokenization
def token_lengths(ds, tokenizer, cfg, task) -> tuple[list[int], int, int]:
    """Tokens per example with special tokens and no truncation; also (unknown, total) token counts."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model accepts" is what we measure
    lengths, unknown, total = [], 0, 0
    unk = tokenizer.unk_token_id
    try:
        for start in range(0, len(ds), 1000):
            enc = task.explore_encode(tokenizer, ds[start:start + 1000], cfg)
            for ids in enc["input_ids"]:
                lengths.append(len(ids))
                total += len(ids)
                if unk is not None:
                    unknown += sum(1 for i in ids if i == unk)
    finally:
        hf_logging.set_verbosity(verbosity)
    return lengths, unknown, total


def show_tokens(tokenizer, text: str) -> dict:
    """What the tokenizer does to one text: tokens, ids, special tokens, the decoded round trip."""
    enc = tokenizer(text, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    mask = enc.get("special_tokens_mask") or [0] * len(ids)
    decoded = tokenizer.decode(ids)
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    norm = lambda s: " ".join(s.split())  # noqa: E731
    if plain == text:
        round_trip = "exact"
    elif norm(plain) == norm(text):
        round_trip = "same up to whitespace"
    elif norm(plain).lower() == norm(text).lower():
        round_trip = "same up to case (this tokenizer lower-cases)"
    else:
        round_trip = "lossy"
    special_map = {}
    for name in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token"):
        token = getattr(tokenizer, name, None)
        if token is not None and str(token) not in special_map:
            special_map[str(token)] = tokenizer.convert_tokens_to_ids(str(token))
    return {
        "text": text, "tokens": tokens, "ids": ids, "num_tokens": len(ids),
        "special_tokens_in_text": [t for t, m in zip(tokens, mask) if m],
        "special_tokens": special_map,
        "unknown_tokens": sum(1 for i in ids if tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id),
        "decoded": decoded, "decoded_without_special_tokens": plain, "round_trip": round_trip,
    }


# ------------------------------------------------------------------ facts
def _label_values(ds, cfg) -> list:
    return list(ds[cfg.label_column])


def explore(cfg: TrainConfig, split: Optional[str] = None, examples: int = 2,
            show_text: Optional[str] = None, tokenizer=None) -> dict:
    """Every fact explore prints, as a JSON-ready dict."""
    from fine_tune.core import data as D
    from fine_tune.core.model import load_tokenizer
    from fine_tune.core.tasks import task_for

    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    task = task_for(cfg)
    if task.explore_kind not in LABEL_FACTS:
        raise UserError(f"fine-tune explore does not describe {task.name} data yet")
    splits = D.load_raw_splits(cfg)
    if split is not None:
        if split not in splits:
            raise UserError(f"--split {split!r}: the data has the splits {', '.join(splits)}")
        splits = {split: splits[split]}
    for name, ds in splits.items():
        D.check_columns(ds, task.columns_read(cfg), name)
    labels = task.infer_labels(splits, cfg)
    splits = D.select_train_samples(splits, cfg)  # the rows a run with these options trains on
    tokenizer = tokenizer or load_tokenizer(cfg, task)
    ref = "train" if "train" in splits else next(iter(splits))
    facts: dict = {
        "task": task.name,
        "tokenizer": cfg.tokenizer_name or cfg.model_name_or_path,
        "splits": {name: len(ds) for name, ds in splits.items()},
        "columns": list(splits[ref].column_names),
        "reference_split": ref,
    }

    # ---- labels: the facts of the task's kind of labels (LABEL_FACTS, below)
    facts["labels"] = LABEL_FACTS[task.explore_kind](splits, cfg, labels.names, ref, examples)

    # ---- token lengths
    limit = model_max_length(tokenizer)
    per_split = {}
    lengths_by_split = {}
    for name, ds in splits.items():
        lengths, unknown, total = token_lengths(ds, tokenizer, cfg, task)
        lengths_by_split[name] = lengths
        stats = length_stats(lengths)
        truncated = int(sum(1 for n in lengths if n > cfg.max_length))
        stats.update({"truncated": truncated, "truncated_share": truncated / len(lengths) if lengths else 0.0,
                      "unknown_token_share": unknown / total if total else 0.0})
        per_split[name] = stats
    p99 = per_split[ref]["p99"]
    facts["token_lengths"] = {
        "max_length": cfg.max_length, "model_max_length": limit, "splits": per_split,
        "recommended_max_length": recommend_max_length(p99, limit),
        "recommended_from": f"p99 of {ref}",
    }
    if show_text is not None:
        facts["tokenization"] = show_tokens(tokenizer, show_text)
    facts["_lengths"] = lengths_by_split  # for the plots; dropped from the printed facts
    return facts


def _examples_by_label(ds, text_of, label_of, names: list[str], n: int) -> dict:
    found: dict[str, list] = {name: [] for name in names}
    if n <= 0:
        return {}
    for i in range(len(ds)):
        row = ds[i]
        name = label_of(row)
        bucket = found.setdefault(name, [])
        if len(bucket) < n:
            bucket.append(text_of(row))
        if all(len(v) >= n for v in found.values()):
            break
    return found


def _text_of(cfg):
    def text(row):
        t = "" if row[cfg.text_column] is None else str(row[cfg.text_column])
        if cfg.text_pair_column:
            t += " ||| " + ("" if row[cfg.text_pair_column] is None else str(row[cfg.text_pair_column]))
        return t
    return text


def _classification_labels(splits, cfg, names, ref, n_examples) -> dict:
    counts = {}
    for name, ds in splits.items():
        c = Counter(_display_label(v, names) for v in _label_values(ds, cfg))
        counts[name] = {label: int(c.get(label, 0)) for label in names}
    train_counts = counts[ref]
    majority = max(names, key=lambda label: (train_counts[label], -names.index(label)))
    minority = min(names, key=lambda label: (train_counts[label], names.index(label)))
    ratio = train_counts[majority] / train_counts[minority] if train_counts[minority] else None
    return {
        "kind": "classes", "names": names, "counts": counts, "shares": {k: _shares(v) for k, v in counts.items()},
        "imbalance_ratio": ratio, "majority_label": majority, "minority_label": minority,
        "missing_in_reference": [label for label in names if train_counts[label] == 0],
        # always predicting train's majority label scores its share of each split
        "majority_baseline_accuracy": {k: _shares(v)[majority] for k, v in counts.items()},
        "class_weights": _class_weight_advice(train_counts, names, ratio),
        "examples": _examples_by_label(splits[ref], _text_of(cfg),
                                       lambda row: _display_label(row[cfg.label_column], names), names, n_examples),
    }


def _label_set_labels(splits, cfg, names, ref, n_examples) -> dict:
    """Multi-label: examples per label, label-set sizes and the two baselines a model must beat."""
    from fine_tune.core import data as D
    from fine_tune.core.metrics import multilabel_metrics

    sets = {split: D.label_sets(ds, cfg, split) for split, ds in splits.items()}
    counts = {split: {n: sum(n in s for s in rows) for n in names} for split, rows in sets.items()}
    sizes = {split: dict(sorted(Counter(len(s) for s in rows).items())) for split, rows in sets.items()}
    top_set, _ = Counter(tuple(sorted(s, key=names.index)) for s in sets[ref]).most_common(1)[0]

    def baseline(predicted: tuple) -> dict:
        out = {}
        for split, rows in sets.items():
            gold = [[n in s for n in names] for s in rows]
            m = multilabel_metrics([[n in predicted for n in names]] * len(rows), gold, names, 0.5)
            out[split] = {k: m[k] for k in ("accuracy", "hamming_loss", "f1_micro", "f1_macro")}
        return out

    n_ref = len(sets[ref])
    weights = D.balanced_class_weights([max(c, 1) for c in counts[ref].values()], n_ref, True, names)
    rarest = min(names, key=lambda n: (counts[ref][n], names.index(n)))
    examples = {n: [] for n in names}
    text_of = _text_of(cfg)
    for i, labels in enumerate(sets[ref]):
        for n in labels:
            if len(examples[n]) < n_examples:
                examples[n].append(text_of(splits[ref][i]))
    return {
        "kind": "label_sets", "names": names, "counts": counts,
        "shares": {k: {n: c / max(len(sets[k]), 1) for n, c in v.items()} for k, v in counts.items()},
        "set_sizes": sizes, "mean_labels_per_example": {k: sum(len(s) for s in v) / max(len(v), 1)
                                                         for k, v in sets.items()},
        "all_negative_baseline": baseline(()), "most_frequent_set": list(top_set),
        "most_frequent_set_baseline": baseline(top_set),
        "rarest_label": rarest,
        "class_weights": {
            "recommended": counts[ref][rarest] < n_ref / 4,
            "why": f"'{rarest}' is on {counts[ref][rarest]} of {n_ref} {ref} examples",
            "balanced": dict(zip(names, weights)),
        },
        "examples": {n: t for n, t in examples.items() if t} if n_examples > 0 else {},
    }


def _class_weight_advice(train_counts: dict, names: list[str], ratio) -> dict:
    """--class_weights balanced for single-label data: recommended when majority/minority >= 3."""
    from fine_tune.core.data import balanced_class_weights

    present = [n for n in names if train_counts[n]]
    weights = balanced_class_weights([train_counts[n] for n in present], sum(train_counts.values()), False, present)
    return {"recommended": ratio is not None and ratio >= IMBALANCE_RATIO,
            "why": f"majority/minority {ratio:.2f}" if ratio is not None else "a label never occurs",
            "balanced": dict(zip(present, weights))}


def _regression_labels(splits, cfg, names, ref, n_examples) -> dict:
    import numpy as np

    stats, values = {}, {}
    for name, ds in splits.items():
        arr = np.asarray([float(v) for v in _label_values(ds, cfg)], dtype=float)
        values[name] = arr
        stats[name] = {"count": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std()),
                       "min": float(arr.min()), "p25": float(np.percentile(arr, 25)),
                       "median": float(np.median(arr)), "p75": float(np.percentile(arr, 75)), "max": float(arr.max())}
    mean = float(values[ref].mean())
    examples = []
    ds = splits[ref]
    text = _text_of(cfg)
    for i in range(min(n_examples * 3, len(ds))):
        examples.append({"label": float(ds[i][cfg.label_column]), "text": text(ds[i])})
    return {
        "kind": "values", "stats": stats,
        # always predicting train's mean label
        "mean_baseline": {"prediction": mean,
                          "mse": {k: float(((v - mean) ** 2).mean()) for k, v in values.items()},
                          "mae": {k: float(np.abs(v - mean).mean()) for k, v in values.items()}},
        "examples": examples, "_values": {k: v.tolist() for k, v in values.items()},
    }


def _tag_labels(splits, cfg, names, ref, n_examples) -> dict:
    from fine_tune.core.metrics import extract_entities

    counts, entities, words, no_entity = {}, {}, {}, {}
    for name, ds in splits.items():
        tag_counter: Counter = Counter()
        entity_counter: Counter = Counter()
        per_sentence, empty = [], 0
        for tags in ds[cfg.tags_column]:
            tags = [_display_label(t, names) for t in tags]
            tag_counter.update(tags)
            per_sentence.append(len(tags))
            spans = extract_entities(tags)  # as the entity F1 of evaluation reads them
            entity_counter.update(kind for kind, _, _ in spans)
            empty += not spans
        counts[name] = {t: int(tag_counter.get(t, 0)) for t in names}
        entities[name] = dict(sorted(entity_counter.items(), key=lambda kv: -kv[1]))
        words[name] = length_stats(per_sentence)
        no_entity[name] = empty / len(ds) if len(ds) else 0.0
    outside = "O" if "O" in names else None
    train_counts = counts[ref]
    majority = max(names, key=lambda t: train_counts[t])
    present = [t for t in names if train_counts[t] > 0]
    minority = min(present, key=lambda t: train_counts[t]) if present else majority
    examples = []
    ds = splits[ref]
    for i in range(len(ds)):
        row = ds[i]
        tags = [_display_label(t, names) for t in row[cfg.tags_column]]
        if any(t != outside for t in tags):
            examples.append(" ".join(f"{w}/{t}" if t != outside else str(w)
                                     for w, t in zip(row[cfg.tokens_column], tags)))
        if len(examples) >= n_examples * 2:
            break
    return {
        "kind": "tags", "names": names, "counts": counts, "shares": {k: _shares(v) for k, v in counts.items()},
        "entities": entities, "sentences_without_entities": no_entity, "words_per_sentence": words,
        "imbalance_ratio": train_counts[majority] / train_counts[minority] if train_counts[minority] else None,
        "majority_label": majority, "minority_label": minority,
        # tagging every token with train's most frequent tag (usually O): token accuracy, entity F1 0
        "majority_baseline_accuracy": {k: _shares(v)[majority] for k, v in counts.items()},
        "examples": examples,
    }


# a task's explore_kind -> the label facts explore gathers for it (explore_report prints each kind)
LABEL_FACTS = {"classes": _classification_labels, "label_sets": _label_set_labels, "values": _regression_labels,
               "tags": _tag_labels}


@main_guard
def main(argv: Optional[list[str]] = None) -> None:
    cfg, args = parse_args(argv)
    facts = explore(cfg, split=args.split, examples=args.examples, show_text=args.show_tokens)
    if args.plots:
        facts["plots"] = write_plots(facts, args.plots)
    if args.json:
        print(json.dumps(public(facts), indent=2))
    else:
        sys.stdout.write(render(facts))


if __name__ == "__main__":
    main()
