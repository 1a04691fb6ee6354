"""Label columns, read and checked: the pieces every task's label reading is made of.

Label checks run over whole Arrow columns (pyarrow.compute), not row by row in Python: a
10-million-row file is checked in about a second instead of minutes. Row numbers in errors
come from the first index of a boolean mask. Which column holds the labels, and what a valid
label is, each task says (fine_tune.core.tasks); the helpers here know no task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fine_tune.core.errors import UserError

IGNORE_INDEX = -100  # a position without a label (special tokens, later sub-words): no loss, no metric


# ------------------------------------------------------------------ columns and rows
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
    import numpy as np

    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value)



def class_label_of(ds, column):
    """The ClassLabel of a label column (of its items, for tag lists), or None."""
    from datasets import ClassLabel

    feature = ds.features.get(column)
    feature = getattr(feature, "feature", feature)  # Sequence/List of tags
    if isinstance(feature, list) and feature:
        feature = feature[0]
    return feature if isinstance(feature, ClassLabel) else None


def arrow_column(ds, column: str):
    """A column as one pyarrow array (the rows a ``select`` kept, in order)."""
    import pyarrow as pa

    col = ds.with_format("arrow")[column]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def first_true(mask) -> Optional[int]:
    """Index of the first true value of a boolean pyarrow array (nulls count as false), or None."""
    import pyarrow.compute as pc

    index = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if index < 0 else index


def missing_mask(values):
    """Null, NaN, or blank text: a label that is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pc.is_null(values, nan_is_null=pa.types.is_floating(values.type))
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        mask = pc.or_(mask, pc.equal(pc.utf8_trim_whitespace(values), ""))
    return mask


def checked_labels(ds, column: str, values, rows, split: str):
    """Label values (one flat pyarrow array; ``rows``: each value's row, None when value i is
    row i) with missing labels and ClassLabel ids out of range refused, naming the row, and
    ClassLabel ids turned into their names."""
    import numpy as np
    import pyarrow as pa

    bad = first_true(missing_mask(values))
    if bad is not None:
        raise UserError(f"the {split} data has an empty or NaN label in row {rows[bad] if rows is not None else bad} "
                        f"(column {column!r}); fill or drop that row")
    class_label = class_label_of(ds, column)
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
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    ids = np.repeat(np.arange(len(counts)), counts)
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(len(counts)), y=ids)]

