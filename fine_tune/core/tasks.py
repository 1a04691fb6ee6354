"""The tasks: one class per task, each saying all that a run, ``fine-tune predict`` and
``fine-tune explore`` do differently for it. Nothing outside this module asks which task it is.

A task says:

* data: the columns it reads, how its labels are read and checked (the label set), how a
  batch of rows is encoded (inputs, labels, and ``n_units``, the example's loss units), and
  the padding collator of its batches;
* model: the transformers model class, the head's config, the peft task type, tokenizer options;
* loss: each example's loss *sum*, which the loop divides by the step's units;
* evaluation: what one batch contributes (predictions and units), the metrics over the
  gathered predictions, their names, the default best metric, and the loss options it takes;
* predict: how a text's logits become a prediction, how that is shown, written and scored;
* explore: which label facts explore gathers (``explore_kind``) and how it measures lengths.

A new task is one new subclass, registered in :data:`TASKS`. :func:`task_for` makes a run's
task from ``cfg.task``: the one place the name is read (config validation asks the registry).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from fine_tune.core import labels as L
from fine_tune.core.errors import UserError
from fine_tune.core.labels import IGNORE_INDEX, LabelInfo


# ------------------------------------------------------------------ helpers of the tasks
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


def _needs_prefix_space(name: str) -> bool:
    # byte-level BPE tokenizers (GPT-2, RoBERTa) need it for pre-split words
    return any(k in name.lower() for k in ("roberta", "gpt", "bart", "deberta"))


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


# ------------------------------------------------------------------ the base class
class Task:
    """What every task answers. The defaults are those of a sequence-classification model
    (one prediction per example); a subclass overrides what differs."""

    name = ""
    model_class_name = "AutoModelForSequenceClassification"  # transformers' auto class of its model
    peft_task_type = "SEQ_CLS"  # peft's TaskType name
    metrics: tuple = ()  # the metrics its evaluation reports (prefixed eval_/test_ by the loop)
    default_best_metric = "accuracy"  # --metric_for_best_model when none is given
    per_label_metrics = False  # reports f1_<label or entity type> too
    accepts_class_weights = False  # --class_weights
    accepts_label_smoothing = False  # --label_smoothing_factor
    multi_label = False  # --class_weights balanced: pos_weights of binary problems
    split_into_words = False  # inputs come as word lists (the tokenizer's is_split_into_words)
    explore_kind = ""  # the label facts fine-tune explore gathers and prints (commands/explore.py)
    has_label_names = True  # its model's config names its labels (id2label)
    lora_trains_head = True  # with --use_peft the task head (found by model.task_heads) trains in full
    accepts_packing = False  # --packing
    forward_options: dict = {}  # keyword arguments of every training and evaluation forward pass

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    @classmethod
    def matches_model(cls, config) -> bool:
        """Whether a saved model's config (``final/config.json``) is one of this task's models."""
        return False

    # ---------------------------------------------------------------- data
    def label_column_name(self, cfg) -> str:
        """The column that holds the labels (``cfg``: a TrainConfig, or predict's options)."""
        return cfg.label_column

    def input_column(self, cfg) -> str:
        return cfg.text_column

    def columns_read(self, cfg) -> dict:
        """The columns a run reads, by the option that names them."""
        return {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
                "label_column": cfg.label_column}

    def infer_labels(self, splits: dict, cfg) -> LabelInfo:
        """Label names from the data (a ClassLabel's names, sorted strings, or 0..max for ints) and
        the class weights of ``--class_weights``. Call it on the whole training split, before
        ``select_train_samples``: --max_train_samples is a speed knob, not a definition of the
        task, so the names come from every training row; the class weights from the rows trained on."""
        info = self.read_labels(splits, cfg)
        if cfg.class_weights is not None:  # counted on the rows trained on (see docs/training.md)
            info.class_weights = self.resolve_class_weights(cfg, info.names,
                                                            L.select_train_samples(splits, cfg)["train"])
        return info

    def read_labels(self, splits: dict, cfg) -> LabelInfo:
        raise NotImplementedError

    def label_counts(self, train, cfg, names: list[str]) -> list[int]:
        """Examples per label in the training rows (for --class_weights balanced)."""
        raise NotImplementedError

    def resolve_class_weights(self, cfg, names: list[str], train) -> list[float]:
        """--class_weights as one weight per label (multi-label: each label's pos_weight)."""
        spec = cfg.class_weight_spec()
        if spec == "balanced":
            return L.balanced_class_weights(self.label_counts(train, cfg, names), len(train), self.multi_label, names)
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

    def prepare_split(self, ds, cfg, split: str):
        """A split made ready to encode, and the keyword arguments of its encoder."""
        return ds, {}

    def encoder(self, tokenizer, cfg, info: LabelInfo):
        """``encode(batch, **kwargs)`` for ``Dataset.map(batched=True)``: the model inputs,
        ``labels``, ``n_units`` (the example's loss units) and ``length`` (its tokens)."""
        raise NotImplementedError

    def collator_class(self):
        """transformers' collator that pads this task's examples into a batch."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding

    # ---------------------------------------------------------------- model
    def tokenizer_kwargs(self, name: str) -> dict:
        return {}

    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def configure_head(self, config, labels: LabelInfo) -> None:
        """Set the model config's head: number of labels, their names, the problem type."""
        config.num_labels = labels.num_labels
        config.id2label, config.label2id = labels.id2label, labels.label2id

    def peft_type(self):
        from peft import TaskType

        return getattr(TaskType, self.peft_task_type)

    # ---------------------------------------------------------------- loss and evaluation
    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        """Per-example loss *sums* (over labelled tokens for token classification, over labels for
        multi-label), times the example's weight (0 for the sampler's stand-ins).

        The loop sums these and divides by the loss units of the whole optimizer step, over all
        micro-batches and ranks (the data's ``n_units``), so that accumulation and data parallelism
        give the gradient of one big batch: examples; labelled tokens for NER; (example, label)
        pairs for multi-label; with ``class_weights`` for single-label, the weights of the
        examples' classes. Each is then exactly torch's own mean-reduced loss over the step:
        ``CrossEntropyLoss(weight=class_weights, label_smoothing=...)`` or
        ``BCEWithLogitsLoss(pos_weight=class_weights)``. Evaluation calls this without class
        weights and smoothing.
        """
        raise NotImplementedError

    def eval_batch(self, logits, target, accelerator):
        """One evaluation batch's loss units per example, predictions and targets, ready for
        ``gather_for_metrics``."""
        import torch

        return torch.ones(target.shape[0], device=logits.device), logits.argmax(-1), target

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        """The metrics over every gathered batch, and the flat (predictions, references) that
        the extra --metric metrics score."""
        raise NotImplementedError

    def loss_metrics(self, loss: float) -> dict:
        """Metrics that follow from the evaluation's mean loss (a language model's perplexity)."""
        return {}

    def metric_names(self, label_names=(), extra=()) -> list[str]:
        """Every metric an evaluation of this task reports: the built-in ones, one per label
        where the task has them, and the names the extra ``--metric`` metrics return."""
        names = list(self.metrics) + self.label_metric_names(label_names)
        return names + [n for n in extra if n not in names]

    def label_metric_names(self, label_names) -> list[str]:
        return []

    # ---------------------------------------------------------------- fine-tune predict
    def text_input(self, text: str):
        """A --text as the model reads it."""
        return text

    def prediction(self, logits, enc, row: int, text):
        """Row ``row`` of a batch's (float) logits as this task's prediction."""
        raise NotImplementedError

    def show(self, text: str, pred, id2label: dict, args) -> str:
        """The line(s) predict prints for a --text."""
        raise NotImplementedError

    def record(self, pred, text, id2label: dict, args) -> dict:
        """One row of predict's jsonl output."""
        raise NotImplementedError

    def gold_labels(self, ds, args) -> list:
        """A --file's labels."""
        return ds[self.label_column_name(args)]

    def score(self, preds: list, gold: list, id2label: dict, threshold: float = 0.5) -> dict:
        """Metrics of predictions against a file's labels (what predict prints besides)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- fine-tune explore
    def explore_encode(self, tokenizer, batch: dict, cfg):
        """A batch of rows tokenized without truncation (explore measures the lengths)."""
        texts = ["" if t is None else str(t) for t in batch[cfg.text_column]]
        pairs = (["" if t is None else str(t) for t in batch[cfg.text_pair_column]]
                 if cfg.text_pair_column else None)
        return tokenizer(texts, pairs, truncation=False)


class TextInput:
    """Tasks whose input is a text (or a text pair) per example: encoding the texts is shared,
    the labels are the task's (:meth:`label_encoder`)."""

    def encoder(self, tokenizer, cfg, info: LabelInfo):
        pad_to_max = cfg.padding == "max_length"
        add_labels = self.label_encoder(cfg, info)

        def encode_text(batch, class_label=None):
            texts = batch[cfg.text_column]
            pairs = batch[cfg.text_pair_column] if cfg.text_pair_column else None
            texts = ["" if t is None else str(t) for t in texts]
            if pairs is not None:
                pairs = ["" if t is None else str(t) for t in pairs]
            enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length,
                            padding="max_length" if pad_to_max else False)
            add_labels(enc, batch, class_label)
            enc["length"] = [sum(m) for m in enc["attention_mask"]]
            return enc

        return encode_text

    def label_encoder(self, cfg, info: LabelInfo):
        """``add(enc, batch, class_label)``: set ``labels`` and ``n_units`` of an encoded batch."""
        raise NotImplementedError


class ClassLabels(Task):
    """Tasks with one class per example (or per word): the label set read from a label column,
    every label checked against it, and a cross-entropy loss."""

    def label_column(self, ds, cfg, split: str):
        """The labels of a split as one flat pyarrow array and, per value, its row (None: value
        i is row i); ClassLabel ids are turned into their names. Missing labels and ids out of
        range are errors naming the row."""
        column = self.label_column_name(cfg)
        return L.checked_labels(ds, column, L.arrow_column(ds, column), None, split)

    def read_labels(self, splits: dict, cfg) -> LabelInfo:
        """Label names: --label_names, else a ClassLabel's names, else the training split's
        labels (sorted strings, or sorted integers: 1..5 are five classes "1".."5"). A label of
        another split that is not among them is an error naming it (a typo, or a class that
        would never be trained)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.label_column_name(cfg)
        ref = "train" if "train" in splits else next(iter(splits))  # explore may look at one split
        class_label = L.class_label_of(splits[ref], column)
        columns = {split: self.label_column(ds, cfg, split) for split, ds in splits.items()}
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
                ints = sorted({int(v) for v in pc.unique(pc.cast(L.label_keys(values), pa.int64())).to_pylist()})
                if ints and ints[0] < 0:  # -1 often marks "no label" (GLUE's test splits)
                    raise UserError(f"label {ints[0]} in column {column!r} is negative; integer labels are class "
                                    "numbers (0..N-1 or 1..N); drop unlabelled rows")
                names = [str(i) for i in ints]
            else:
                raise UserError(f"column {column!r} holds labels of type {values.type}; use all strings or all "
                                "integers")
        if len(names) < 2:
            raise UserError(f"column {column!r} has only {len(names)} distinct label(s); "
                            "classification needs at least 2")
        self._check_known(columns, names, column, ref, cfg)
        return LabelInfo(names=names)

    @staticmethod
    def _check_known(columns: dict, names: list[str], column: str, ref: str, cfg) -> None:
        """Every split's labels are among ``names``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        known = pa.array(names, pa.string())
        for split, (values, rows) in columns.items():
            keys = L.label_keys(values)
            bad = L.first_true(pc.invert(pc.is_in(keys, value_set=known)))
            if bad is None:
                continue
            unknown, row = values[bad].as_py(), rows[bad] if rows is not None else bad
            if cfg.label_names:
                raise UserError(f"the {split} data has label {unknown!r} in row {row}, which is not in "
                                f"--label_names ({', '.join(names)})")
            raise UserError(f"the {split} data has label {unknown!r} in row {row}, which the {ref} data does "
                            f"not have (its labels: {', '.join(names)}); fix the label, or declare the full set "
                            "with --label_names")

    def label_counts(self, train, cfg, names: list[str]) -> list[int]:
        """Examples per label in the training rows (token classification: tags)."""
        import pyarrow.compute as pc

        counted = pc.value_counts(L.label_keys(self.label_column(train, cfg, "train")[0])).to_pylist()
        counts = {c["values"]: c["counts"] for c in counted}
        return [counts.get(n, 0) for n in names]

    def prepare_split(self, ds, cfg, split: str):
        return ds, {"class_label": L.class_label_of(ds, self.label_column_name(cfg))}

    @staticmethod
    def label_id_of(info: LabelInfo):
        """``label_id(value, class_label)``: a label's id (read_labels checked that every label has one)."""
        label2id = info.label2id

        def label_id(value, class_label) -> int:
            return label2id[class_label.int2str(int(value)) if class_label is not None else L.label_key(value)]

        return label_id


# ------------------------------------------------------------------ the tasks
class TextClassification(TextInput, ClassLabels):
    """One class per text (or text pair): sentiment, topic, entailment."""

    name = "text-classification"
    metrics = ("loss", "accuracy", "precision_weighted", "recall_weighted", "f1_weighted",
               "precision_macro", "recall_macro", "f1_macro")
    accepts_class_weights = accepts_label_smoothing = True
    explore_kind = "classes"

    @classmethod
    def matches_model(cls, config) -> bool:
        return True  # a sequence-classification model of none of the other kinds

    def label_encoder(self, cfg, info: LabelInfo):
        label_id = self.label_id_of(info)

        def add(enc, batch, class_label):
            enc["labels"] = [label_id(v, class_label) for v in batch[cfg.label_column]]
            # a class-weighted loss is averaged over the weights of the step's examples (as torch's
            # CrossEntropyLoss(weight=...) does over a batch), so each example counts its class's weight
            weights = info.class_weights or [1.0] * len(info.label2id)
            enc["n_units"] = [float(weights[i]) for i in enc["labels"]]

        return add

    def configure_head(self, config, labels: LabelInfo) -> None:
        super().configure_head(config, labels)
        config.problem_type = "single_label_classification"

    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none",
                               label_smoothing=label_smoothing) * weight

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        import torch

        from fine_tune.core import metrics as M

        p_arr, g_arr = torch.cat(preds).numpy(), torch.cat(golds).numpy()
        return M.classification_metrics(p_arr, g_arr, labels.num_labels), p_arr, g_arr

    def prediction(self, logits, enc, row: int, text):
        probs = logits[row].softmax(-1)
        return int(probs.argmax()), float(probs.max())

    def show(self, text: str, pred, id2label: dict, args) -> str:
        return f"{id2label[pred[0]]}\t{pred[1]:.3f}\t{text}"

    def record(self, pred, text, id2label: dict, args) -> dict:
        return {"label": id2label[pred[0]], "score": pred[1]}

    def score(self, preds: list, gold: list, id2label: dict, threshold: float = 0.5) -> dict:
        import numpy as np

        from fine_tune.core import metrics as M

        label2id = {v: k for k, v in id2label.items()}
        try:
            y = np.array([label2id[g] if isinstance(g, str) else int(g) for g in gold])
        except KeyError as e:
            raise UserError(f"label {e.args[0]!r} is not one of the model's labels: {', '.join(label2id)}") from None
        p = np.array([p[0] for p in preds])
        result = M.classification_metrics(p, y, len(id2label))
        print(M.confusion(p, y, [id2label[i] for i in range(len(id2label))]))
        return result


class MultiLabelClassification(TextInput, Task):
    """Any number of labels per text: a sigmoid and a binary decision per label."""

    name = "multi-label-classification"
    metrics = ("loss", "accuracy", "hamming_loss", "precision_micro", "recall_micro",
               "f1_micro", "precision_macro", "recall_macro", "f1_macro")  # and f1_<label>
    default_best_metric = "f1_micro"
    per_label_metrics = True
    accepts_class_weights = True
    multi_label = True
    explore_kind = "label_sets"

    @classmethod
    def matches_model(cls, config) -> bool:
        return config.problem_type == "multi_label_classification"

    def read_labels(self, splits: dict, cfg) -> LabelInfo:
        """The label set of the training split (or --label_names); other splits may not add names."""
        for split, ds in splits.items():
            L.check_columns(ds, {"label_column": cfg.label_column}, split)
        sets = {split: L.label_sets(ds, cfg, split) for split, ds in splits.items()}
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
                    raise UserError(f"the {split} data has label {unknown[0]!r} in row {row}, which is not in "
                                    f"{origin} ({', '.join(names)})")
        return LabelInfo(names=names)

    def label_counts(self, train, cfg, names: list[str]) -> list[int]:
        """Examples that carry each label."""
        from collections import Counter

        counts = Counter(n for labels in L.label_sets(train, cfg, "train") for n in labels)
        return [counts.get(n, 0) for n in names]

    def prepare_split(self, ds, cfg, split: str):
        # the label lists, parsed once (CSV cells split)
        return ds.add_column("_label_set", L.label_sets(ds, cfg, split)), {}

    def label_encoder(self, cfg, info: LabelInfo):
        def add(enc, batch, class_label):
            enc["labels"] = [[1.0 if n in chosen else 0.0 for n in info.names] for chosen in batch["_label_set"]]
            # binary cross-entropy is averaged over every (example, label) pair of a step
            enc["n_units"] = [float(len(info.names))] * len(enc["labels"])

        return add

    def configure_head(self, config, labels: LabelInfo) -> None:
        super().configure_head(config, labels)
        config.problem_type = "multi_label_classification"  # pipeline() then applies a sigmoid per label

    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        per_pair = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=class_weights,
                                                      reduction="none")
        return per_pair.sum(-1) * weight

    def eval_batch(self, logits, target, accelerator):
        import torch

        # a loss unit per (example, label) pair
        count = torch.full((target.shape[0],), float(target.shape[1]), device=logits.device)
        return count, logits.float().sigmoid(), target

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        import torch

        from fine_tune.core import metrics as M

        scores, g_arr = torch.cat(preds).numpy(), torch.cat(golds).numpy().astype(int)
        result = M.multilabel_metrics(scores, g_arr, labels.names, cfg.multilabel_threshold)
        return result, (scores >= cfg.multilabel_threshold).astype(int), g_arr

    def label_metric_names(self, label_names) -> list[str]:
        return [f"f1_{name}" for name in label_names]

    def prediction(self, logits, enc, row: int, text):
        return logits[row].sigmoid().tolist()  # one independent score per label

    def show(self, text: str, pred, id2label: dict, args) -> str:
        chosen = label_set(pred, id2label, args.multilabel_threshold)
        best = max(range(len(pred)), key=lambda i: pred[i])
        shown = ", ".join(f"{k} {v:.3f}" for k, v in chosen.items()) or \
            f"(none; highest {id2label[best]} {pred[best]:.3f})"
        return f"{shown}\t{text}"

    def record(self, pred, text, id2label: dict, args) -> dict:
        chosen = label_set(pred, id2label, args.multilabel_threshold)
        return {"labels": list(chosen), "scores": {id2label[j]: round(v, 4) for j, v in enumerate(pred)}}

    def gold_labels(self, ds, args) -> list:
        """Lists of names (CSV cells split at --label_separator)."""
        cfg = SimpleNamespace(label_column=args.label_column, label_separator=args.label_separator)
        return L.label_sets(ds, cfg, "--file", source=args.file)

    def score(self, preds: list, gold: list, id2label: dict, threshold: float = 0.5) -> dict:
        import numpy as np

        from fine_tune.core import metrics as M

        label2id = {v: k for k, v in id2label.items()}
        names = [id2label[i] for i in range(len(id2label))]
        unknown = next((n for row in gold for n in row if n not in label2id), None)
        if unknown is not None:
            raise UserError(f"label {unknown!r} is not one of the model's labels: {', '.join(names)}")
        y = np.array([[n in row for n in names] for row in gold], dtype=int)
        return M.multilabel_metrics(np.array(preds), y, names, threshold)


class TokenClassification(ClassLabels):
    """One tag per word (named entities, parts of speech); the words come pre-split."""

    name = "token-classification"
    model_class_name = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    split_into_words = True
    metrics = ("loss", "precision", "recall", "f1", "accuracy")  # and f1_<entity type>
    default_best_metric = "f1"
    per_label_metrics = True
    accepts_label_smoothing = True
    explore_kind = "tags"

    @classmethod
    def matches_model(cls, config) -> bool:
        return any(a.endswith("ForTokenClassification") for a in (config.architectures or []))

    def label_column_name(self, cfg) -> str:
        return cfg.tags_column

    def input_column(self, cfg) -> str:
        return cfg.tokens_column

    def columns_read(self, cfg) -> dict:
        return {"tokens_column": cfg.tokens_column, "tags_column": cfg.tags_column}

    def label_column(self, ds, cfg, split: str):
        """One value per tag, each with its row; a tag cell that is not a list is an error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.label_column_name(cfg)
        values = L.arrow_column(ds, column)
        if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
            first = values[0].as_py() if len(values) else None
            raise UserError(f"the {split} data column {column!r} must hold a list of tags per "
                            f"row (row 0 holds {first!r})")
        null_row = L.first_true(pc.is_null(values))
        if null_row is not None:
            raise UserError(f"the {split} data column {column!r} must hold a list of tags per "
                            f"row (row {null_row} holds None)")
        rows = pc.list_parent_indices(values).to_numpy()
        return L.checked_labels(ds, column, pc.list_flatten(values), rows, split)

    def encoder(self, tokenizer, cfg, info: LabelInfo):
        pad_to_max = cfg.padding == "max_length"
        label_id = self.label_id_of(info)

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

        return encode_words

    def collator_class(self):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification

    def tokenizer_kwargs(self, name: str) -> dict:
        return {"add_prefix_space": True} if _needs_prefix_space(name) else {}

    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                                    ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        return per_token.view(labels.shape).sum(-1) * weight

    def eval_batch(self, logits, target, accelerator):
        count = (target != IGNORE_INDEX).sum(-1).float()
        pred = accelerator.pad_across_processes(logits.argmax(-1), dim=1, pad_index=IGNORE_INDEX)
        target = accelerator.pad_across_processes(target, dim=1, pad_index=IGNORE_INDEX)
        return count, pred, target

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        import numpy as np
        import torch

        from fine_tune.core import metrics as M

        width = max(p.shape[1] for p in preds)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=IGNORE_INDEX)  # noqa: E731
        p_all, g_all = torch.cat([pad(p) for p in preds]).numpy(), torch.cat([pad(g) for g in golds]).numpy()
        names = labels.names
        pred_tags = [[names[p] for p, g in zip(pr, gr) if g != IGNORE_INDEX] for pr, gr in zip(p_all, g_all)]
        true_tags = [[names[g] for g in gr if g != IGNORE_INDEX] for gr in g_all]
        result = M.entity_metrics(pred_tags, true_tags, names)
        flat_p, flat_g = [], []
        for pr, gr in zip(p_all, g_all):
            mask = gr != IGNORE_INDEX
            flat_p.extend(pr[mask]), flat_g.extend(gr[mask])
        return result, np.array(flat_p), np.array(flat_g)

    def label_metric_names(self, label_names) -> list[str]:
        from fine_tune.core.metrics import split_tag

        return sorted({f"f1_{etype}" for etype in (split_tag(t)[1] for t in label_names) if etype})

    def text_input(self, text: str):
        return text.split()

    def prediction(self, logits, enc, row: int, text):
        word_ids = enc.word_ids(row)
        pred, seen = [], set()
        for pos, wid in enumerate(word_ids):
            if wid is not None and wid not in seen:
                seen.add(wid)
                pred.append(int(logits[row, pos].argmax()))
        # words cut off by truncation have no prediction: None, never a label id
        # (id 0 can be an entity tag), and they are reported as not scored
        return pred + [None] * (len(text) - len(pred))

    def show(self, text: str, pred, id2label: dict, args) -> str:
        found = entities(text.split(), tag_names(pred, id2label))
        lines = [text] + [f"  {ent['type']}: {ent['text']}" for ent in found]
        if not found:
            lines.append("  (no entities)")
        if unscored(pred):
            lines.append(f"  ({unscored(pred)} words past --max_length {args.max_length} not scored)")
        return "\n".join(lines)

    def record(self, pred, text, id2label: dict, args) -> dict:
        tags = tag_names(pred, id2label)  # null: a word past --max_length, not scored
        return {"tags": tags, "entities": entities(text, tags), "unscored_words": unscored(pred)}

    def score(self, preds: list, gold: list, id2label: dict, threshold: float = 0.5) -> dict:
        from fine_tune.core import metrics as M

        true = [[t if isinstance(t, str) else id2label[int(t)] for t in row] for row in gold]
        # only the words the model saw are scored; the others are counted and reported
        scored = [len(p) - unscored(p) for p in preds]
        result = M.entity_metrics([tag_names(p[:n], id2label) for p, n in zip(preds, scored)],
                                  [g[:n] for g, n in zip(true, scored)])
        result["unscored_words"] = sum(unscored(p) for p in preds)
        if result["unscored_words"]:
            print(f"{result['unscored_words']} words past --max_length were not scored (truncated)", file=sys.stderr)
        return result

    def explore_encode(self, tokenizer, batch: dict, cfg):
        words = [[str(w) for w in row] for row in batch[cfg.tokens_column]]
        return tokenizer(words, is_split_into_words=True, truncation=False)


class Regression(TextInput, Task):
    """A number per text (a rating, a similarity score): one output, squared error."""

    name = "regression"
    metrics = ("loss", "mse", "mae", "pearson", "spearman")
    default_best_metric = "mse"
    explore_kind = "values"
    has_label_names = False

    @classmethod
    def matches_model(cls, config) -> bool:
        return config.problem_type == "regression" or config.num_labels == 1

    def read_labels(self, splits: dict, cfg) -> LabelInfo:
        """No label names; every split's label is a number."""
        import pyarrow as pa

        for split, ds in splits.items():
            values = L.arrow_column(ds, cfg.label_column)
            bad = 0 if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or
                            pa.types.is_null(values.type)) else L.first_true(L.missing_mask(values))
            if bad is not None and len(values):
                raise UserError(f"the {split} data has a missing or non-numeric label in row {bad} "
                                f"(column {cfg.label_column!r}); regression needs a number in every row")
        return LabelInfo(names=[])

    def label_encoder(self, cfg, info: LabelInfo):
        def add(enc, batch, class_label):
            enc["labels"] = [float(v) for v in batch[cfg.label_column]]
            enc["n_units"] = [1.0] * len(enc["labels"])

        return add

    def configure_head(self, config, labels: LabelInfo) -> None:
        config.num_labels, config.problem_type = 1, "regression"

    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        return (logits.float().squeeze(-1) - labels.float()) ** 2 * weight

    def eval_batch(self, logits, target, accelerator):
        import torch

        return torch.ones(target.shape[0], device=logits.device), logits.squeeze(-1).float(), target

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        import torch

        from fine_tune.core import metrics as M

        p_arr, g_arr = torch.cat(preds).numpy(), torch.cat(golds).float().numpy()
        return M.regression_metrics(p_arr, g_arr), p_arr, g_arr

    def prediction(self, logits, enc, row: int, text):
        return float(logits[row, 0])

    def show(self, text: str, pred, id2label: dict, args) -> str:
        return f"{pred:.3f}\t{text}"

    def record(self, pred, text, id2label: dict, args) -> dict:
        return {"prediction": pred}

    def score(self, preds: list, gold: list, id2label: dict, threshold: float = 0.5) -> dict:
        import numpy as np

        from fine_tune.core import metrics as M

        return M.regression_metrics(np.array(preds), np.array(gold, dtype=float))


class CausalLM(Task):
    """A decoder trained as a language model: next-token cross-entropy on the target tokens.

    The data's shape is chosen by its columns (:meth:`data_shape`): ``messages`` (a list of
    ``{role, content}`` rendered with the tokenizer's chat template; the assistant turns are
    the targets), ``prompt`` + ``completion`` (the completion is the target), or the text column
    (``--text_column``, every token a target). The end-of-sequence token is appended and is a
    target when the last segment is. Tokens that are no target have label -100.

    The loss unit is a target token: each example's ``n_units`` is its number of target tokens
    after the shift by one (the first token has nothing to predict it), and its loss the *sum*
    of their cross-entropies, so the loop's division by the step's units makes every optimizer
    step the mean over all target tokens of the global batch, however the tokens fall into
    micro-batches and processes (not a mean of per-micro-batch means).
    """

    name = "causal-lm"
    model_class_name = "AutoModelForCausalLM"
    has_label_names = False
    peft_task_type = "CAUSAL_LM"
    metrics = ("loss", "perplexity")
    default_best_metric = "loss"
    lora_trains_head = False  # the LM head is the (often tied) vocabulary projection: adapters only
    accepts_packing = True
    # no key/value cache in training and evaluation: nothing reuses it, and transformers builds the
    # block-diagonal mask of --packing's blocks from their position ids only without one
    forward_options = {"use_cache": False}

    @classmethod
    def matches_model(cls, config) -> bool:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))

    # ---------------------------------------------------------------- data
    def columns_read(self, cfg) -> dict:
        return {}  # chosen by the columns present (data_shape), checked by read_labels

    @staticmethod
    def data_shape(columns, cfg, split: str) -> str:
        """``messages``, ``prompt`` (with ``completion``) or ``text``, by the columns present."""
        columns = set(columns)
        if "messages" in columns:
            return "messages"
        if "prompt" in columns or "completion" in columns:
            missing = "completion" if "prompt" in columns else "prompt"
            if missing not in columns:
                raise UserError(f"the {split} data has a {'prompt' if missing == 'completion' else 'completion'} "
                                f"column but no {missing!r} column; prompt -> completion data needs both")
            return "prompt"
        if cfg.text_column in columns:
            return "text"
        raise UserError(f"the {split} data has none of the columns causal-lm reads: 'messages' (chat), "
                        f"'prompt' and 'completion', or {cfg.text_column!r} (--text_column); its columns are: "
                        f"{', '.join(sorted(columns))}")

    def read_labels(self, splits: dict, cfg) -> LabelInfo:
        """No label names: the targets are the data's own tokens. Every split has the same shape."""
        shapes = {split: self.data_shape(ds.column_names, cfg, split) for split, ds in splits.items()}
        if len(set(shapes.values())) > 1:
            raise UserError("the splits hold different data shapes (" +
                            ", ".join(f"{s}: {v}" for s, v in shapes.items()) + "); give them the same columns")
        return LabelInfo(names=[])

    def prepare_split(self, ds, cfg, split: str):
        return ds, {"shape": self.data_shape(ds.column_names, cfg, split)}

    def encoder(self, tokenizer, cfg, info: LabelInfo):
        eos = end_of_sequence(tokenizer)
        prefix = special_prefix(tokenizer)

        def ids(text) -> list[int]:
            return tokenizer("" if text is None else str(text), add_special_tokens=False)["input_ids"]

        def encode_lm(batch, shape):
            if shape == "messages":
                examples = [chat_segments(tokenizer, m) for m in batch["messages"]]
                examples = [[(ids(text), trained) for text, trained in segs] for segs in examples]
            elif shape == "prompt":
                examples = [[(prefix + prompt_tail(ids(p), len(prefix) + len(c) + 1, cfg.max_length), False),
                             (c, True)] for p, c in zip(batch["prompt"], map(ids, batch["completion"]))]
            else:
                examples = [[(prefix + ids(t), True)] for t in batch[cfg.text_column]]
            enc = {"input_ids": [], "attention_mask": [], "labels": [], "n_units": [], "length": []}
            for segments in examples:
                input_ids, labels = assemble(segments, eos, cfg.max_length)
                enc["input_ids"].append(input_ids)
                enc["attention_mask"].append([1] * len(input_ids))
                enc["labels"].append(labels)
                enc["n_units"].append(float(target_count(labels)))
                enc["length"].append(len(input_ids))
            return enc

        return encode_lm

    def collator_class(self):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification  # pads the labels with -100

    def pack(self, ds, cfg):
        """--packing: the encoded examples concatenated, in order, into blocks of at most
        ``--max_length`` tokens (an example never split; a new block starts where the next one
        does not fit). ``position_ids`` restart at 0 at each example: transformers' attention masks
        read a restart as the start of another sequence when no attention mask is given, so
        attention never crosses two examples (a block-diagonal causal mask; the same position ids
        are what flash attention's variable-length kernels read). Each example's first label is
        -100: the token before it (the previous example's end) must not learn to predict it, and
        unpacked it is no target either (target_count), so the block's units are its examples'."""
        from datasets import Dataset

        blocks, current = [], None
        for ids, labels, units in zip(ds["input_ids"], ds["labels"], ds["n_units"]):
            if current is None or len(current["input_ids"]) + len(ids) > cfg.max_length:
                current = {"input_ids": [], "labels": [], "position_ids": [], "n_units": 0.0}
                blocks.append(current)
            current["input_ids"] += ids
            current["labels"] += [IGNORE_INDEX] + labels[1:]
            current["position_ids"] += list(range(len(ids)))
            current["n_units"] += units
        for block in blocks:
            block["length"] = len(block["input_ids"])
        return Dataset.from_list(blocks)

    @staticmethod
    def collate_packed(features: list[dict], pad_id: int, pad_to_multiple_of=None) -> dict:
        """A batch of packed blocks: padded at the end to the longest, the padding a sequence of
        its own (positions from 0, labels -100), and no attention mask (see :meth:`pack`)."""
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            n = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [pad_id] * n)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * n)
            batch["position_ids"].append(f["position_ids"] + list(range(n)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    def configure_head(self, config, labels: LabelInfo) -> None:
        pass  # the LM head predicts the vocabulary: nothing to set

    # ---------------------------------------------------------------- loss and evaluation
    def example_losses(self, logits, labels, weight, class_weights=None, label_smoothing: float = 0.0):
        """Per-example sums of next-token cross-entropy over the target tokens: position t's
        logits predict label t + 1."""
        import torch.nn.functional as F

        targets = labels[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    reduction="none", ignore_index=IGNORE_INDEX)
        return per_token.view(targets.shape).sum(-1) * weight

    def eval_batch(self, logits, target, accelerator):
        # a loss unit per target token; no predictions to keep (the loss is the metric)
        count = (target[:, 1:] != IGNORE_INDEX).sum(-1).float()
        return count, count, count

    def eval_metrics(self, preds: list, golds: list, labels: LabelInfo, cfg):
        import numpy as np

        return {}, np.array([]), np.array([])

    def loss_metrics(self, loss: float) -> dict:
        """Perplexity: exp of the mean cross-entropy per target token over the whole split."""
        import math

        return {"perplexity": math.exp(min(loss, 700.0))}  # capped: exp overflows a float past ~709

    # ---------------------------------------------------------------- fine-tune predict
    def text_input(self, text: str):
        raise UserError("fine-tune predict does not generate text yet; load final/ with AutoModelForCausalLM "
                        "or a text-generation pipeline")

    def input_column(self, cfg) -> str:
        return self.text_input("")


def end_of_sequence(tokenizer) -> int:
    """The token that ends a sequence: EOS, else the separator (BERT-style vocabularies)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise UserError("the tokenizer has no end-of-sequence token (nor a separator) to end each example "
                        "with; add one with tokenizer.add_special_tokens({'eos_token': ...}) and save it")
    return eos


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS, BERT's CLS; none for
    GPT-2): found by tokenizing a word with and without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def chat_segments(tokenizer, messages) -> list[tuple[str, bool]]:
    """A conversation rendered with the tokenizer's chat template, as (text, is_target) pieces:
    each assistant turn (what the template writes for it after the generation prompt, its
    end-of-turn marks included) is a target, everything else is not. Each turn's text is found
    as the difference between the renderings of the conversation up to it, with the generation
    prompt, and through it."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the data has a 'messages' column but the tokenizer has no chat template to render it "
                        "with; use a tokenizer that has one (or set its chat_template), or give text or "
                        "prompt/completion columns")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(upto, generation_prompt=False) -> str:
        if not upto and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1)
        if not (before.startswith(done) and through.startswith(before)):
            raise UserError("the tokenizer's chat template does not render a conversation as the rendering of "
                            "its first turns followed by the next ones, so the assistant turns cannot be found")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    rest = render(len(messages))
    if not rest.startswith(done):
        raise UserError("the tokenizer's chat template does not render a conversation as the rendering of "
                        "its first turns followed by the next ones, so the assistant turns cannot be found")
    segments.append((rest[len(done):], False))
    return [(text, trained) for text, trained in segments if text]


def prompt_tail(prompt: list[int], others: int, max_length: int) -> list[int]:
    """The end of a prompt that leaves room for ``others`` tokens (its special prefix, the
    completion and EOS) within ``max_length``: a long prompt loses its start rather than the
    completion its targets (which would leave the example nothing to learn)."""
    room = max(max_length - others, 0)
    return prompt[len(prompt) - room:] if len(prompt) > room else prompt


def assemble(segments: list, eos: int, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of (ids, is_target) segments, with the end-of-sequence token appended
    (unless the text already ends with it; a target when the last segment is) and cut to
    ``max_length`` at the end (a prompt was already cut at its start, see :func:`prompt_tail`)."""
    input_ids, labels = [], []
    for piece, trained in segments:
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if not input_ids or input_ids[-1] != eos:
        last_trained = bool(segments) and segments[-1][1]
        input_ids.append(eos)
        labels.append(eos if last_trained else IGNORE_INDEX)
    return input_ids[:max_length], labels[:max_length]


def target_count(labels: list[int]) -> int:
    """Loss units of an example: its target tokens after the shift (the first has no predictor)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# ------------------------------------------------------------------ the registry
# --task name -> the task (this order is the order --help and messages list them in)
TASKS: dict[str, Task] = {t.name: t for t in (TextClassification(), MultiLabelClassification(),
                                              TokenClassification(), Regression(), CausalLM())}


def as_task(task) -> Task:
    """A task given by name or as itself."""
    return TASKS[task] if isinstance(task, str) else task


def task_for(cfg) -> Task:
    """The task of a run: the one place ``cfg.task`` is read."""
    return TASKS[cfg.task]


def task_of_model(config) -> Task:
    """The task of a saved model, from its config: a language model by its architecture,
    multi-label before regression (a model with one label can be either), text classification
    when nothing else matches."""
    for name in ("causal-lm", "multi-label-classification", "regression", "token-classification"):
        if TASKS[name].matches_model(config):
            return TASKS[name]
    return TASKS["text-classification"]
