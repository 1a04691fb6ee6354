"""Data: load (hub or local files), check, label, tokenize, collate, and batch by optimizer step.

What differs by task (the columns read, the labels, the encoding, the collator) the run's task
says (fine_tune.core.tasks); this module does the rest the same way for every task.

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
# the label helpers live in fine_tune.core.labels; these names are kept here for the callers
from fine_tune.core.labels import IGNORE_INDEX, LabelInfo, balanced_class_weights, check_columns, label_key, \
    label_sets, select_train_samples  # noqa: F401
from fine_tune.core.tasks import align_labels, task_for  # noqa: F401

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


def columns_read(cfg, task=None) -> dict:
    """The columns a run reads, by the option that names them (the task says which)."""
    return (task or task_for(cfg)).columns_read(cfg)


def infer_labels(splits: dict, cfg, task=None) -> LabelInfo:
    """The label names and class weights, as the run's task reads them (see ``Task.infer_labels``)."""
    return (task or task_for(cfg)).infer_labels(splits, cfg)


# ------------------------------------------------------------------ tokenize
def tokenize_splits(splits: dict, tokenizer, cfg, info: LabelInfo, task=None) -> dict:
    """Tokenize every split once (datasets caches the result by fingerprint), with the task's encoder."""
    task = task or task_for(cfg)
    encode = task.encoder(tokenizer, cfg, info)
    out = {}
    for split, ds in splits.items():
        check_columns(ds, task.columns_read(cfg), split)
        ds, kwargs = task.prepare_split(ds, cfg, split)
        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs,
                            num_proc=cfg.preprocessing_num_workers, desc=f"tokenizing {split}")
        if split == "train" and getattr(cfg, "packing", False):  # evaluation stays one example per row
            out[split] = task.pack(out[split], cfg)
    return out


# ------------------------------------------------------------------ collate
class Collator:
    """Pad a list of examples into a batch (with the task's padding collator); examples given
    as negative indices are stand-ins (weight 0) for a rank that has no real example in a micro-step."""

    def __init__(self, tokenizer, cfg, task=None):
        padding = "max_length" if cfg.padding == "max_length" else "longest"
        self.task = task or task_for(cfg)
        self.pad_to_multiple_of = cfg.pad_to_multiple_of
        self.pad = self.task.collator_class()(
            tokenizer, padding=padding, max_length=cfg.max_length, pad_to_multiple_of=cfg.pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        weights = [f.pop("weight", 1.0) for f in features]
        for f in features:
            f.pop("n_units", None)
            f.pop("length", None)
        if "position_ids" in features[0]:  # --packing's blocks
            batch = self.task.collate_packed(features, self.pad.tokenizer.pad_token_id, self.pad_to_multiple_of)
            batch["weight"] = torch.tensor(weights, dtype=torch.float32)
            return batch
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
