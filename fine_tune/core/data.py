"""Data: load (hub or local files), check, label, tokenize, collate, and batch by optimizer step.

The batching is what makes every topology compute the same thing. :class:`StepSampler`
cuts each epoch's shuffled order into *optimizer steps* of ``global_batch =
per_device_batch x processes x accumulation`` examples, then deals each step out to
micro-steps and ranks. One process with batch 8, one with 4 x 2 accumulation and two
with batch 4 therefore see the same examples in each optimizer step, and a short last
step is split the same way everywhere. The order depends only on (seed, epoch), so a
resumed run continues at the next unseen step without reading the skipped data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from fine_tune.core.errors import UserError, first_line

IGNORE_INDEX = -100
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
              ".conll": "conll", ".txt": "conll"}  # conll: one "word tag" per line, blank line between sentences


# ------------------------------------------------------------------ loading
def _file_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_TYPES:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of "
                        f"{', '.join(sorted(FILE_TYPES))}")
    return FILE_TYPES[suffix]


def _is_tsv(path: str) -> bool:
    return Path(path).suffix.lower() == ".tsv"


def _first_bad_row(path: str, kind: str) -> str:
    """Find where a file that failed to load goes wrong, to name the line in the error."""
    try:
        if kind == "json":
            import json

            with open(path, encoding="utf-8") as f:
                head = f.read(1).strip()
            if head == "[":
                json.loads(Path(path).read_text(encoding="utf-8"))
                return ""
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as e:
                            return f"line {lineno}: {e.msg}"
        elif kind == "csv":
            import pandas as pd

            pd.read_csv(path, sep="\t" if _is_tsv(path) else ",")
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - we only want its message
        return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return ""


def load_local_file(path: str):
    import datasets

    if not Path(path).is_file():
        raise UserError(f"data file {path} does not exist; check the path given to --train_file, "
                        "--validation_file or --test_file")
    kind = _file_type(path)
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path} has no rows (the file is empty); give a file with data")
    if kind == "conll":
        from datasets import Dataset

        from fine_tune.core.conll import read_conll

        rows = read_conll(Path(path).read_text(encoding="utf-8"))
        if not rows:
            raise UserError(f"{path} holds no sentences; CoNLL files have one 'word tag' per line and a blank "
                            "line between sentences")
        return Dataset.from_list(rows)  # columns: tokens, tags
    kwargs = {"delimiter": "\t"} if _is_tsv(path) else {}
    try:
        return datasets.load_dataset(kind, data_files={"data": path}, split="data", **kwargs)
    except Exception as e:  # datasets wraps parser errors; find the row ourselves
        where = _first_bad_row(path, kind)
        detail = where or (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise UserError(f"{path} is not valid {kind.upper()}: {detail}") from None


def load_raw_splits(cfg) -> dict:
    """Return {'train', 'validation'[, 'test']} as datasets.Dataset objects."""
    import datasets

    if cfg.dataset_name:
        try:
            raw = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
        except Exception as e:  # noqa: BLE001 - no hub, unknown name, ...
            raise UserError(f"could not load data set {cfg.dataset_name!r}: {first_line(e)}. "
                            "Without the hub, use --train_file/--validation_file") from None
        splits = dict(raw)
    elif cfg.train_file or cfg.validation_file or cfg.test_file:
        splits = {}
        for split, path in (("train", cfg.train_file), ("validation", cfg.validation_file),
                            ("test", cfg.test_file)):
            if path:
                splits[split] = load_local_file(path)
    else:
        raise UserError("no data: give --dataset_name (hub) or --train_file (local csv/json/jsonl/parquet); "
                        "`fine-tune prepare-data` makes the default data set")
    if "validation" not in splits:
        if "test" in splits:  # hub sets like yelp_review_full have only train/test
            splits["validation"] = splits.pop("test")
        elif "train" in splits and cfg.validation_split_percentage > 0:
            held = splits["train"].train_test_split(test_size=cfg.validation_split_percentage / 100,
                                                    seed=cfg.seed)
            splits["train"], splits["validation"] = held["train"], held["test"]
    # --max_train_samples is applied later (select_train_samples), once the labels are known
    for split in ("validation", "test"):
        if cfg.max_eval_samples and split in splits:
            splits[split] = splits[split].select(range(min(cfg.max_eval_samples, len(splits[split]))))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"the {split} split has no rows (after --max_eval_samples); "
                            "check the data file and that option")
        check_columns(ds, columns_read(cfg), split)
    return splits


def columns_read(cfg) -> dict:
    """The columns a run reads, by the option that names them."""
    if cfg.task == "token-classification":
        return {"tokens_column": cfg.tokens_column, "tags_column": cfg.tags_column}
    return {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
            "label_column": cfg.label_column}


def select_train_samples(splits: dict, cfg) -> dict:
    """The first --max_train_samples rows of the training split. Called after infer_labels:
    the label set (and its order) is the whole training split's, so a subset that lacks a
    rare class still trains a model with every class."""
    if not cfg.max_train_samples or "train" not in splits:
        return splits
    return {**splits, "train": splits["train"].select(range(min(cfg.max_train_samples, len(splits["train"]))))}


def check_columns(ds, needed: dict, split: str) -> None:
    for flag, column in needed.items():
        if column and column not in ds.column_names:
            raise UserError(f"the {split} data has no column {column!r} (set by --{flag}); "
                            f"its columns are: {', '.join(ds.column_names)}")


# ------------------------------------------------------------------ labels
@dataclass
class LabelInfo:
    names: list[str]  # empty for regression
    # per-class loss weights in label order (multi-label: each label's pos_weight); None: unweighted
    class_weights: Optional[list[float]] = None

    @property
    def num_labels(self) -> int:
        return max(len(self.names), 1)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip() == "")


def label_key(value) -> str:
    """A label's name: integers (also 3.0 from a float column) by their digits, anything else as text."""
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value)


def _label_column(cfg) -> str:
    return cfg.tags_column if cfg.task == "token-classification" else cfg.label_column


def _class_label(ds, column):
    """The ClassLabel of a label column (of its items, for tag lists), or None."""
    from datasets import ClassLabel

    feature = ds.features.get(column)
    feature = getattr(feature, "feature", feature)  # Sequence/List of tags
    if isinstance(feature, list) and feature:
        feature = feature[0]
    return feature if isinstance(feature, ClassLabel) else None


# Label checks run over whole Arrow columns (pyarrow.compute), not row by row in Python: a
# 10-million-row file is checked in about a second instead of minutes. Row numbers in errors
# come from the first index of a boolean mask.
def _column(ds, column: str):
    """A column as one pyarrow array (the rows a ``select`` kept, in order)."""
    import pyarrow as pa

    col = ds.with_format("arrow")[column]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _first_true(mask) -> Optional[int]:
    """Index of the first true value of a boolean pyarrow array (nulls count as false), or None."""
    import pyarrow.compute as pc

    index = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if index < 0 else index


def _missing_mask(values):
    """Null, NaN, or blank text: a label that is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pc.is_null(values, nan_is_null=pa.types.is_floating(values.type))
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        mask = pc.or_(mask, pc.equal(pc.utf8_trim_whitespace(values), ""))
    return mask


def label_column(ds, cfg, split: str):
    """The labels of a split as one flat pyarrow array and, per value, its row (token
    classification: one value per tag); ClassLabel ids are turned into their names. Missing
    labels, tag cells that are not lists and ids out of range are errors naming the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = _label_column(cfg)
    values = _column(ds, column)
    rows = None  # value i comes from row i
    if cfg.task == "token-classification":
        if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
            first = values[0].as_py() if len(values) else None
            raise UserError(f"the {split} data column {column!r} must hold a list of tags per "
                            f"row (row 0 holds {first!r})")
        null_row = _first_true(pc.is_null(values))
        if null_row is not None:
            raise UserError(f"the {split} data column {column!r} must hold a list of tags per "
                            f"row (row {null_row} holds None)")
        rows = pc.list_parent_indices(values).to_numpy()
        values = pc.list_flatten(values)
    bad = _first_true(_missing_mask(values))
    if bad is not None:
        raise UserError(f"the {split} data has an empty or NaN label in row {rows[bad] if rows is not None else bad} "
                        f"(column {column!r}); fill or drop that row")
    class_label = _class_label(ds, column)
    if class_label is not None:
        ids = values.to_numpy(zero_copy_only=False).astype(np.int64)
        outside = np.flatnonzero((ids < 0) | (ids >= class_label.num_classes))
        if len(outside):
            raise UserError(f"the {split} data has label {ids[outside[0]]} outside 0..{class_label.num_classes - 1} "
                            f"(num_labels={class_label.num_classes})")
        values = pa.array(class_label.names).take(pa.array(ids))
    return values, rows


def label_keys(values):
    """Label names as strings (``label_key`` for a whole column): integers, also 3.0 from a float
    column, by their digits; text as it is. Non-integral numbers are an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values
    if pa.types.is_floating(values.type):
        if not pc.all(pc.equal(pc.floor(values), values)).as_py():
            raise UserError("the label column holds fractional numbers; class labels are text or integers "
                            "(use --task regression for numeric targets)")
        values = pc.cast(values, pa.int64())
    if pa.types.is_integer(values.type) or pa.types.is_boolean(values.type):
        return pc.cast(values, pa.string())
    raise UserError(f"the label column holds values of type {values.type}; class labels are text or integers")


def label_values(ds, cfg, split: str) -> list:
    """Each row's labels as they are in the data (a list per row for token classification),
    ClassLabel ids turned into their names (for commands that show labels row by row)."""
    values, rows = label_column(ds, cfg, split)
    flat = values.to_pylist()
    if rows is None:
        return flat
    out = [[] for _ in range(len(ds))]
    for row, value in zip(rows, flat):
        out[row].append(value)
    return out


def infer_labels(splits: dict, cfg) -> LabelInfo:
    """Label names from the data (a ClassLabel's names, sorted strings, or 0..max for ints) and
    the class weights of ``--class_weights``. Call it on the whole training split, before
    ``select_train_samples``: --max_train_samples is a speed knob, not a definition of the
    task, so the names come from every training row; the class weights from the rows trained on."""
    if cfg.task == "multi-label-classification":
        info = _multilabel_info(splits, cfg)
    else:
        info = _single_label_info(splits, cfg)
    if cfg.class_weights is not None:  # counted on the rows trained on (see docs/training.md)
        info.class_weights = resolve_class_weights(cfg, info.names, select_train_samples(splits, cfg)["train"])
    return info


def _regression_check(splits: dict, cfg) -> None:
    import pyarrow as pa

    for split, ds in splits.items():
        values = _column(ds, cfg.label_column)
        bad = 0 if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or
                        pa.types.is_null(values.type)) else _first_true(_missing_mask(values))
        if bad is not None and len(values):
            raise UserError(f"the {split} data has a missing or non-numeric label in row {bad} "
                            f"(column {cfg.label_column!r}); regression needs a number in every row")


def _single_label_info(splits: dict, cfg) -> LabelInfo:
    """Label names: --label_names, else a ClassLabel's names, else the training split's
    labels (sorted strings, or sorted integers: 1..5 are five classes "1".."5"). A label of
    another split that is not among them is an error naming it (a typo, or a class that
    would never be trained)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if cfg.task == "regression":
        _regression_check(splits, cfg)
        return LabelInfo(names=[])

    column = _label_column(cfg)
    ref = "train" if "train" in splits else next(iter(splits))  # explore may look at one split
    class_label = _class_label(splits[ref], column)
    columns = {split: label_column(ds, cfg, split) for split, ds in splits.items()}
    if cfg.label_names:
        names = [n.strip() for n in cfg.label_names.split(",")]
    elif class_label is not None:
        names = list(class_label.names)
    else:
        values = columns[ref][0]
        distinct = pc.unique(values)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            names = sorted(distinct.to_pylist())
        elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
            ints = sorted({int(v) for v in pc.unique(pc.cast(label_keys(values), pa.int64())).to_pylist()})
            if ints and ints[0] < 0:  # -1 often marks "no label" (GLUE's test splits)
                raise UserError(f"label {ints[0]} in column {column!r} is negative; integer labels are class "
                                "numbers (0..N-1 or 1..N); drop unlabelled rows")
            names = [str(i) for i in ints]
        else:
            raise UserError(f"column {column!r} holds labels of type {values.type}; use all strings or all integers")
    if len(names) < 2:
        raise UserError(f"column {column!r} has only {len(names)} distinct label(s); "
                        "classification needs at least 2")
    known = pa.array(names, pa.string())
    for split, (values, rows) in columns.items():
        keys = label_keys(values)
        bad = _first_true(pc.invert(pc.is_in(keys, value_set=known)))
        if bad is None:
            continue
        unknown, row = values[bad].as_py(), rows[bad] if rows is not None else bad
        if cfg.label_names:
            raise UserError(f"the {split} data has label {unknown!r} in row {row}, which is not in "
                            f"--label_names ({', '.join(names)})")
        raise UserError(f"the {split} data has label {unknown!r} in row {row}, which the {ref} data does "
                        f"not have (its labels: {', '.join(names)}); fix the label, or declare the full set "
                        "with --label_names")
    return LabelInfo(names=names)


def _split_source(cfg, split: str) -> Optional[str]:
    """The local file a split was read from (validation may come from test or train)."""
    return {"train": cfg.train_file, "test": cfg.test_file,
            "validation": cfg.validation_file or cfg.test_file or cfg.train_file}.get(split)


def label_sets(ds, cfg, split: str, source: Optional[str] = None) -> list[list[str]]:
    """Multi-label: each row's label names. JSON/parquet/hub columns hold lists (an empty list
    is an example with no label); a CSV/TSV cell holds names joined by --label_separator (an
    empty cell: no label). ``source``: the file the rows come from, if not the split's."""
    source = source or _split_source(cfg, split)
    in_text_table = bool(source) and Path(source).suffix.lower() in (".csv", ".tsv")
    out = []
    for row, value in enumerate(ds[cfg.label_column]):
        if in_text_table and (value is None or isinstance(value, (str, int, float))):
            text = "" if _is_missing(value) else str(value)
            names = [n.strip() for n in text.split(cfg.label_separator) if n.strip()]
        elif isinstance(value, (list, tuple)):
            if any(_is_missing(v) for v in value):
                raise UserError(f"the {split} data has an empty or null label name in row {row} "
                                f"(column {cfg.label_column!r}): {value!r}")
            names = [str(v) for v in value]
        else:
            raise UserError(f"the {split} data column {cfg.label_column!r} must hold a list of label names per row "
                            f"for --task multi-label-classification (row {row} holds {value!r}); write [] for none")
        out.append(list(dict.fromkeys(names)))  # a name twice is the same label
    return out


def _multilabel_info(splits: dict, cfg) -> LabelInfo:
    """The label set of the training split (or --label_names); other splits may not add names."""
    for split, ds in splits.items():
        check_columns(ds, {"label_column": cfg.label_column}, split)
    sets = {split: label_sets(ds, cfg, split) for split, ds in splits.items()}
    if cfg.label_names:
        names, origin = [n.strip() for n in cfg.label_names.split(",")], "--label_names"
    else:
        seen = {n for labels in sets.get("train", []) for n in labels}
        numeric = all(n.lstrip("-").isdigit() for n in seen)
        names, origin = sorted(seen, key=int if numeric else str), "the training split"
    if not names:
        raise UserError(f"the label column {cfg.label_column!r} of the training split holds no labels (every row "
                        "is empty); multi-label classification needs at least one label name")
    allowed = set(names)
    for split, rows in sets.items():
        for row, labels in enumerate(rows):
            unknown = [n for n in labels if n not in allowed]
            if unknown:
                raise UserError(f"the {split} data has label {unknown[0]!r} in row {row}, which is not in {origin} "
                                f"({', '.join(names)})")
    return LabelInfo(names=names)


def resolve_class_weights(cfg, names: list[str], train) -> list[float]:
    """--class_weights as one weight per label (multi-label: each label's pos_weight)."""
    spec = cfg.class_weight_spec()
    if spec == "balanced":
        return balanced_class_weights(train_label_counts(train, cfg, names), len(train),
                                      cfg.task == "multi-label-classification", names)
    if isinstance(spec, list):
        if len(spec) != len(names):
            raise UserError(f"--class_weights gives {len(spec)} weights for {len(names)} labels "
                            f"({', '.join(names)}); give one per label, in that order, or a mapping")
        return spec
    unknown = [k for k in spec if k not in names]
    if unknown:
        raise UserError(f"--class_weights names label {unknown[0]!r}, which is not one of the labels "
                        f"({', '.join(names)})")
    return [spec.get(n, 1.0) for n in names]


def train_label_counts(train, cfg, names: list[str]) -> list[int]:
    """Examples per label in the training rows (multi-label: examples that carry it; token
    classification: tags)."""
    from collections import Counter

    import pyarrow.compute as pc

    if cfg.task == "multi-label-classification":
        counts = Counter(n for labels in label_sets(train, cfg, "train") for n in labels)
    else:
        counted = pc.value_counts(label_keys(label_column(train, cfg, "train")[0])).to_pylist()
        counts = {c["values"]: c["counts"] for c in counted}
    return [counts.get(n, 0) for n in names]


def balanced_class_weights(counts: list[int], n_examples: int, multi_label: bool, names: list[str]) -> list[float]:
    """scikit-learn's 'balanced' weights, n / (classes x count). Multi-label: each label is a
    binary problem and its pos_weight is the ratio of those weights, negatives / positives
    (torch's BCEWithLogitsLoss recipe); a label on every example has nothing to balance (1)."""
    absent = [n for n, c in zip(names, counts) if c == 0]
    if absent:
        raise UserError(f"--class_weights balanced: label {absent[0]!r} has no training example, so it has no "
                        "frequency to balance; give explicit weights")
    if multi_label:
        return [(n_examples - c) / c if c < n_examples else 1.0 for c in counts]
    from sklearn.utils.class_weight import compute_class_weight

    ids = np.repeat(np.arange(len(counts)), counts)
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(len(counts)), y=ids)]


# ------------------------------------------------------------------ tokenize
def tokenize_splits(splits: dict, tokenizer, cfg, info: LabelInfo) -> dict:
    """Tokenize every split once (datasets caches the result by fingerprint)."""
    pad_to_max = cfg.padding == "max_length"
    label2id = info.label2id
    column = _label_column(cfg)

    def label_id(value, class_label) -> int:  # infer_labels checked that every label has an id
        return label2id[class_label.int2str(int(value)) if class_label is not None else label_key(value)]

    def encode_text(batch, class_label=None):
        texts = batch[cfg.text_column]
        pairs = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        texts = ["" if t is None else str(t) for t in texts]
        if pairs is not None:
            pairs = ["" if t is None else str(t) for t in pairs]
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length,
                        padding="max_length" if pad_to_max else False)
        if cfg.task == "regression":
            enc["labels"] = [float(v) for v in batch[cfg.label_column]]
            enc["n_units"] = [1.0] * len(texts)
        elif cfg.task == "multi-label-classification":
            enc["labels"] = [[1.0 if n in chosen else 0.0 for n in info.names] for chosen in batch["_label_set"]]
            # binary cross-entropy is averaged over every (example, label) pair of a step
            enc["n_units"] = [float(len(info.names))] * len(texts)
        else:
            enc["labels"] = [label_id(v, class_label) for v in batch[cfg.label_column]]
            # a class-weighted loss is averaged over the weights of the step's examples (as torch's
            # CrossEntropyLoss(weight=...) does over a batch), so each example counts its class's weight
            weights = info.class_weights or [1.0] * len(label2id)
            enc["n_units"] = [float(weights[i]) for i in enc["labels"]]
        enc["length"] = [sum(m) for m in enc["attention_mask"]]
        return enc

    def encode_words(batch, class_label=None):
        enc = tokenizer(batch[cfg.tokens_column], is_split_into_words=True, truncation=True,
                        max_length=cfg.max_length, padding="max_length" if pad_to_max else False)
        all_labels = []
        for i, tags in enumerate(batch[cfg.tags_column]):
            ids = [label_id(t, class_label) for t in tags]
            all_labels.append(align_labels(enc.word_ids(i), ids, cfg.label_all_tokens))
        enc["labels"] = all_labels
        enc["n_units"] = [float(sum(1 for x in lab if x != IGNORE_INDEX)) for lab in all_labels]
        enc["length"] = [sum(m) for m in enc["attention_mask"]]
        return enc

    fn = encode_words if cfg.task == "token-classification" else encode_text
    out = {}
    for split, ds in splits.items():
        check_columns(ds, columns_read(cfg), split)
        kwargs = {"class_label": _class_label(ds, column)} if cfg.task not in ("regression",
                                                                               "multi-label-classification") else {}
        if cfg.task == "multi-label-classification":  # the label lists, parsed once (CSV cells split)
            ds = ds.add_column("_label_set", label_sets(ds, cfg, split))
        out[split] = ds.map(fn, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs,
                            num_proc=cfg.preprocessing_num_workers, desc=f"tokenizing {split}")
    return out


def align_labels(word_ids: list, word_labels: list[int], label_all_tokens: bool) -> list[int]:
    """Give each sub-word token its word's label: the first sub-token of a word always,
    the others only with ``label_all_tokens`` (else -100); special tokens get -100."""
    labels, previous = [], None
    for wid in word_ids:
        if wid is None:
            labels.append(IGNORE_INDEX)
        elif wid != previous:
            labels.append(word_labels[wid])
        else:
            labels.append(word_labels[wid] if label_all_tokens else IGNORE_INDEX)
        previous = wid
    return labels


# ------------------------------------------------------------------ collate
class Collator:
    """Pad a list of examples into a batch; examples given as negative indices are
    stand-ins (weight 0) for a rank that has no real example in a micro-step."""

    def __init__(self, tokenizer, cfg):
        from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

        padding = "max_length" if cfg.padding == "max_length" else "longest"
        if cfg.task == "token-classification":
            self.pad = DataCollatorForTokenClassification(
                tokenizer, padding=padding, max_length=cfg.max_length, pad_to_multiple_of=cfg.pad_to_multiple_of)
        else:
            self.pad = DataCollatorWithPadding(
                tokenizer, padding=padding, max_length=cfg.max_length, pad_to_multiple_of=cfg.pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        weights = [f.pop("weight", 1.0) for f in features]
        for f in features:
            f.pop("n_units", None)
            f.pop("length", None)
        batch = self.pad(features)
        if self.pad.tokenizer.padding_side == "left" and "attention_mask" in batch:
            # decoder tokenizers often pad on the left: count positions from each text's first real
            # token, so that a text gets the same position ids (and logits) on either padding side
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["weight"] = torch.tensor(weights, dtype=torch.float32)
        return batch


class IndexedDataset:
    """Map the sampler's indices to examples; index -(i+1) is example i with weight 0."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            example = dict(self.ds[-idx - 1])
            example["weight"] = 0.0
            return example
        return dict(self.ds[idx])


# ------------------------------------------------------------------ sampler
class StepSampler:
    """Yield this rank's micro-batches (lists of dataset indices), step by step.

    Each epoch: a permutation seeded by (seed, epoch); with ``group_by_length``, it is cut
    into mega-batches of 16 optimizer steps, each sorted by length, and the steps of the
    epoch are then shuffled, so batches hold similar lengths but come in random order.
    Each optimizer step of n <= global_batch examples is split into ceil(n / (world x
    micro_batch)) micro-steps, and each micro-step's examples as evenly as possible over
    the ranks. A rank left with nothing gets a weight-0 stand-in so that every rank runs
    the same number of forward/backward passes (collectives stay matched).
    """

    MEGA_STEPS = 16

    def __init__(self, lengths, n_units, micro_batch: int, accumulation: int, world: int, rank: int,
                 seed: int, group_by_length: bool):
        self.lengths = np.asarray(lengths)
        self.n_units = np.asarray(n_units)
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.world, self.rank = world, rank
        self.seed, self.group_by_length = seed, group_by_length
        self.global_batch = micro_batch * accumulation * world

    def __len__(self) -> int:  # optimizer steps per epoch
        return math.ceil(len(self.lengths) / self.global_batch)

    def epoch_steps(self, epoch: int) -> list[np.ndarray]:
        """All optimizer steps of an epoch, as arrays of global indices (same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        g = self.global_batch
        if not self.group_by_length:
            return [order[i:i + g] for i in range(0, len(order), g)]
        mega = g * self.MEGA_STEPS
        steps = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            steps += [chunk[i:i + g] for i in range(0, len(chunk), g)]
        perm = rng.permutation(len(steps))
        return [steps[i] for i in perm]

    def micro_batches(self, step: np.ndarray) -> list[list[int]]:
        """This rank's micro-batches of one optimizer step."""
        per_micro = self.micro_batch * self.world
        out = []
        for start in range(0, len(step), per_micro):
            micro = step[start:start + per_micro]
            mine = np.array_split(micro, self.world)[self.rank]
            out.append([int(i) for i in mine] if len(mine) else [-(int(micro[0]) + 1)])
        return out

    def units(self, step: np.ndarray) -> float:
        """Loss units of a step over all ranks: examples, labelled tokens, (example, label) pairs
        for multi-label, or the examples' class weights for a class-weighted loss."""
        return float(self.n_units[step].sum())

    def tokens(self, step: np.ndarray) -> int:
        return int(self.lengths[step].sum())


@dataclass
class StepBatch:
    """One optimizer step, from this rank's point of view."""
    micro_batches: list  # collated batches
    units: float  # loss units (or weights) of the whole step, all ranks
    examples: int  # examples of the whole step, all ranks
    tokens: int  # non-padding tokens of the whole step, all ranks


class StepLoader:
    """Iterate optimizer steps of one epoch from a given position, collating on the fly
    (in worker processes when ``num_workers`` > 0)."""

    def __init__(self, dataset, sampler: StepSampler, collator, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = IndexedDataset(dataset)
        self.sampler = sampler
        self.collator = collator
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def __len__(self):
        return len(self.sampler)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[StepBatch]:
        import torch

        steps = self.sampler.epoch_steps(epoch)[start_step:]
        plan = [self.sampler.micro_batches(s) for s in steps]
        flat = [mb for micro in plan for mb in micro]
        # A private generator: a DataLoader iterator draws a seed from the global torch RNG
        # otherwise, and a resumed run would create its iterator at another point of the
        # dropout RNG stream than the run it continues (no longer bit-exact).
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=flat, collate_fn=self.collator, num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.sampler.seed + epoch))
        it = iter(loader)
        for step, micro in zip(steps, plan):
            yield StepBatch(micro_batches=[next(it) for _ in micro], units=self.sampler.units(step),
                            examples=len(step), tokens=self.sampler.tokens(step))


def eval_dataloader(dataset, collator, batch_size: int, num_workers: int = 0):
    """Evaluation batches, sorted by length (less padding); order does not matter for metrics."""
    import torch

    order = np.argsort(-np.asarray(dataset["length"]), kind="stable")
    return torch.utils.data.DataLoader(
        IndexedDataset(dataset.select(order)), batch_size=batch_size, shuffle=False,
        collate_fn=collator, num_workers=num_workers, generator=torch.Generator().manual_seed(0))


def data_fingerprint(cfg) -> Optional[str]:
    """The content of the training and validation data (sha256 of the local files; the hub
    data set's name and configuration), kept in a checkpoint: resuming on other data is refused."""
    import hashlib

    if cfg.dataset_name:
        return f"{cfg.dataset_name}/{cfg.dataset_config_name or ''}"
    digest = hashlib.sha256()
    for path in (cfg.train_file, cfg.validation_file):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        digest.update(b"\0")  # separates the files
    return digest.hexdigest()
