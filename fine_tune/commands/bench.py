"""Throughput benchmark: how many examples per second each way of training turns into a model.

``fine-tune bench`` trains the same model on the same examples with the same batch
size, learning rate, weight decay, schedule and seed, each run in a fresh process:

* ``a``: ``transformers.Trainer`` at its default settings, inputs padded to ``--max_length``;
* ``b``: ``Trainer`` at its best settings: dynamic padding, ``train_sampling_strategy=
  "group_by_length"``, fused AdamW;
* ``c``: a bare PyTorch loop (no Accelerate) on exactly the batches our loop sees (the same
  :class:`~fine_tune.core.data.StepSampler` and :class:`~fine_tune.core.data.Collator`): forward,
  backward, clip, step of a plain ``torch.optim.AdamW`` with our parameter groups and our
  default kernel, so that ``d`` against ``c`` measures the loop's overhead on identical work;
* ``d``: ``train.py`` at its default settings;
* ``e``: ``train.py`` with the options that help on this machine (``--best``).

A mode may carry options, e.g. ``d+bf16``, ``d+compile``, ``d+fused``, ``d+foreach`` (the
multi-tensor AdamW), ``d+maxlen`` (padding to max length), ``d+nogroup`` (no length grouping),
``c+bf16``; that is how each optimisation is measured on its own.

Every run trains on the first ``steps x batch_size`` training examples, i.e. exactly one
epoch, so all modes see the same examples (in their own order; ``c`` and ``d`` in the same
order). The first ``--warmup_steps`` steps are not timed. Step times are split into data
(fetching and collating the batch), forward (the model call), backward, optimizer (gradient
clipping and the update) and other (loss, scheduler, logging, bookkeeping). The split comes
from timers placed around the library calls the loops make (``Accelerator.backward``,
``Accelerator.clip_grad_norm_``, ``AcceleratedOptimizer.step``, hooks on the model's call,
the batch iterator), installed in the benchmark's worker process, so ``train.py``'s code runs
unchanged: the worker builds the config with ``parse_args`` and calls ``loop.run`` exactly
as ``train.py`` does. Tokens are counted from each batch's attention mask (non-padding
tokens); the padding share is the fraction of the model's input positions that are padding.
Accuracy is measured after training, in float32, on the first ``--eval_samples`` examples
of the held-out file, with the same evaluation code for every mode. Peak memory is the
worker's peak resident set size (and peak GPU memory on a GPU).

Each mode runs ``--repeats`` times, repeats interleaved (a b c d e a b c d e ...) so that a
change in machine load hits every mode alike; the table shows medians and ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODES = {
    "a": "Trainer, default settings, padding to max length",
    "b": "Trainer, best settings (dynamic padding, group_by_length, fused AdamW)",
    "c": "bare PyTorch loop on our batches",
    "d": "train.py, default settings",
    "e": "train.py, best options",
}
OPTIONS = {
    "bf16": "bf16 autocast",
    "fp32": "float32",
    "compile": "torch.compile",
    "fused": "fused AdamW",
    "foreach": "multi-tensor (not fused) AdamW",
    "maxlen": "padding to max length",
    "nogroup": "no length grouping",
}
WORKLOADS = ("short", "long")
PHASES = ("data", "forward", "backward", "optimizer")
DEFAULT_TRAIN = "data/sentiment/train.jsonl"
DEFAULT_EVAL = "data/sentiment/validation.jsonl"


# ====================================================================== modes
def parse_mode(mode: str, best: str, precision: str) -> dict:
    """'d+bf16+compile' -> the settings of that run."""
    base, *opts = mode.split("+")
    if base not in MODES:
        raise ValueError(f"unknown mode {base!r}; modes are {', '.join(MODES)} (with +options)")
    if base == "e":
        base, opts = "d", [o for o in best.split(",") if o] + opts
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise ValueError(f"unknown option {bad[0]!r} in mode {mode!r}; options are {', '.join(OPTIONS)}")
    s = {"runner": {"a": "trainer", "b": "trainer", "c": "bare", "d": "ours"}[base],
         # fused: True / False forces the AdamW kernel; None keeps the default of train.py (c, d) or Trainer (a)
         "precision": precision, "compile": False, "fused": True if base == "b" else None, "padding": "longest",
         "group_by_length": True, "trainer_defaults": base == "a"}
    if base == "a":
        s.update(padding="max_length", group_by_length=False)
    for o in opts:
        if o in ("bf16", "fp32"):
            s["precision"] = o
        elif o == "compile":
            s["compile"] = True
        elif o == "fused":
            s["fused"] = True
        elif o == "foreach":
            s["fused"] = False
        elif o == "maxlen":
            s["padding"] = "max_length"
        elif o == "nogroup":
            s["group_by_length"] = False
    return s


def loop_flags(spec: dict, settings: dict, out_dir: str) -> list[str]:
    """train.py flags of a run (also used to build the same data and model for a, b and c)."""
    opts = {
        "model_name_or_path": spec["model"], "train_file": spec["train_file"],
        "max_train_samples": spec["steps"] * spec["batch_size"], "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"], "max_length": spec["max_length"],
        "learning_rate": spec["learning_rate"], "weight_decay": spec["weight_decay"], "seed": spec["seed"],
        "lr_scheduler_type": "linear", "warmup_steps": 0, "max_grad_norm": 1.0,
        "eval_strategy": "no", "save_strategy": "no", "logging_steps": max(spec["warmup_steps"], 1),
        "validation_split_percentage": 0, "output_dir": out_dir, "overwrite_output_dir": "true",
        "disable_tqdm": "true", "report_to": "none",
        "padding": settings["padding"], "group_by_length": str(settings["group_by_length"]).lower(),
        "mixed_precision": "bf16" if settings["precision"] == "bf16" else "no",
        "torch_compile": str(settings["compile"]).lower(),
    }
    if settings["fused"] is not None:
        opts["optim"] = "adamw_torch_fused" if settings["fused"] else "adamw_torch"
    if spec.get("peak_flops"):
        opts["peak_flops"] = spec["peak_flops"]
    flags = []
    for k, v in opts.items():
        flags += [f"--{k}", str(v)]
    return flags


# ====================================================================== timing
class Probe:
    """Per-phase timers and token counters of one training run.

    Step k (1-based) is timed when k > warmup. A step runs from the end of the previous
    optimizer update to the end of its own, so the window of the timed steps is
    ``end[steps] - end[warmup]``, and everything the loop does in between is in it.
    """

    def __init__(self, warmup: int, device, split: bool):
        import torch

        self.warmup = warmup
        self.cuda = device.type == "cuda"
        self.split = split
        self.completed = 0  # optimizer steps done
        self.ends: list[float] = []  # end time of each optimizer step
        self.start = time.perf_counter()
        self.phase = dict.fromkeys(PHASES, 0.0)
        self.examples = {"timed": 0, "all": 0}
        self.positions = {"timed": 0, "all": 0}
        # summed on the device, read once at the end (no host sync per step)
        self.tokens = {"timed": torch.zeros((), dtype=torch.int64, device=device),
                       "all": torch.zeros((), dtype=torch.int64, device=device)}
        self._forward_start = None
        self.target = None  # the last step (synchronised at on a GPU when phases are not split)
        self.step_positions: dict[int, int] = {}  # input positions (padding included) of each step
        self.info: dict = {}  # facts about the run (e.g. which AdamW kernel ran)

    @property
    def timing(self) -> bool:
        return self.completed >= self.warmup

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def now(self) -> float:
        if self.split:
            self.sync()
        return time.perf_counter()

    @contextlib.contextmanager
    def timed(self, phase: str):
        t = self.now()
        try:
            yield
        finally:
            if self.timing:
                self.phase[phase] += self.now() - t

    def step_end(self):
        self.completed += 1
        if not self.split and self.completed in (self.warmup, self.target):
            self.sync()
        self.ends.append(time.perf_counter())

    # ---- model hooks: forward time and token counts of training calls
    def forward_pre(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        n, positions = ids.shape[0], ids.numel()
        real = mask.sum() if mask is not None else positions
        for key in ("all", "timed") if self.timing else ("all",):
            self.examples[key] += n
            self.positions[key] += positions
            self.tokens[key] += real
        self.step_positions[self.completed] = self.step_positions.get(self.completed, 0) + positions
        self._forward_start = self.now()

    def forward_post(self, module, args, kwargs, output):
        if module.training and self._forward_start is not None:
            if self.timing:
                self.phase["forward"] += self.now() - self._forward_start
            self._forward_start = None

    def attach(self, model):
        if getattr(model, "_bench_probe", None) is self:
            return
        model.register_forward_pre_hook(self.forward_pre, with_kwargs=True)
        model.register_forward_hook(self.forward_post, with_kwargs=True)
        model._bench_probe = self

    def summary(self) -> dict:
        timed_steps = len(self.ends) - self.warmup
        window = self.ends[-1] - self.ends[self.warmup - 1] if self.warmup > 0 else self.ends[-1] - self.start
        tokens = {k: int(v) for k, v in self.tokens.items()}
        ms = 1000.0 / max(timed_steps, 1)
        out = {
            "steps": len(self.ends), "timed_steps": timed_steps, "window_s": window,
            "examples_timed": self.examples["timed"], "tokens_timed": tokens["timed"],
            "positions_timed": self.positions["timed"],
            "examples_all": self.examples["all"], "tokens_all": tokens["all"], "positions_all": self.positions["all"],
            "samples_per_second": self.examples["timed"] / window,
            "tokens_per_second": tokens["timed"] / window,
            "padding_share": 1.0 - tokens["timed"] / max(self.positions["timed"], 1),
            "step_ms": window * ms,
            # every step, warm-up included (the first counts from the worker's start): the wall
            # time and the input positions it processed
            "step_times_ms": [1000 * (b - a) for a, b in zip([self.start] + self.ends, self.ends)],
            "step_positions": [self.step_positions.get(i, 0) for i in range(len(self.ends))],
        }
        if self.split:
            for p in PHASES:
                out[f"{p}_ms"] = self.phase[p] * ms
            out["other_ms"] = out["step_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
        return out


def patch_libraries(probe: Probe) -> None:
    """Wrap the library calls both our loop and the Trainer make, in this process only."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch import nn

    from fine_tune.core import data as D

    def wrap(cls, name, phase, after=None):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            with probe.timed(phase):
                result = original(*args, **kwargs)
            if after is not None:
                after()
            return result

        setattr(cls, name, wrapper)

    wrap(Accelerator, "backward", "backward")
    wrap(Accelerator, "clip_grad_norm_", "optimizer")
    wrap(AcceleratedOptimizer, "step", "optimizer", after=probe.step_end)

    prepare = Accelerator.prepare

    def prepare_and_attach(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        for obj in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(obj, nn.Module):
                probe.attach(obj)
            elif isinstance(obj, AcceleratedOptimizer):
                probe.info["adamw_fused"] = bool(obj.optimizer.defaults.get("fused"))
        return result

    Accelerator.prepare = prepare_and_attach

    iterate = D.StepLoader.iterate

    def timed_iterate(self, *args, **kwargs):
        gen = iterate(self, *args, **kwargs)
        while True:
            with probe.timed("data"):
                item = next(gen, None)
            if item is None:
                return
            yield item

    D.StepLoader.iterate = timed_iterate

    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return
    wrap(Trainer, "get_batch_samples", "data")


# ====================================================================== worker
def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepare(spec: dict, settings: dict, out_dir: str):
    """The config, tokenizer, labels, tokenized data and model, built as loop.run builds them."""
    from accelerate.utils import set_seed

    from fine_tune.core import data as D
    from fine_tune.core.config import parse_args
    from fine_tune.core.model import load_model, load_tokenizer

    cfg = parse_args(loop_flags(spec, settings, out_dir))
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    splits = D.load_raw_splits(cfg)
    labels = D.infer_labels(splits, cfg)  # from the whole training split, as train.py does
    splits = D.select_train_samples(splits, cfg)
    tokenized = D.tokenize_splits(splits, tokenizer, cfg, labels)
    model = load_model(cfg, labels, tokenizer)
    return cfg, tokenizer, labels, tokenized["train"], model


def run_trainer(spec, settings, probe, out_dir):
    import torch
    from transformers import Trainer, TrainingArguments

    cfg, tokenizer, _, train_ds, model = _prepare(spec, settings, out_dir)
    train_ds = train_ds.remove_columns(["n_units"])
    kwargs = dict(
        output_dir=out_dir, per_device_train_batch_size=cfg.per_device_train_batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, seed=cfg.seed,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=cfg.max_grad_norm,
        use_cpu=not torch.cuda.is_available(), bf16=settings["precision"] == "bf16",
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        torch_compile=settings["compile"])
    if not settings["trainer_defaults"]:
        kwargs["train_sampling_strategy"] = "group_by_length" if settings["group_by_length"] else "random"
    if settings["fused"] is not None:
        kwargs["optim"] = "adamw_torch_fused" if settings["fused"] else "adamw_torch"
    args = TrainingArguments(**kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    trainer.train()
    return trainer.model, {"trainer_optim": str(getattr(args.optim, "value", args.optim)),
                           "trainer_sampling": args.train_sampling_strategy}


def run_bare(spec, settings, probe, out_dir):
    """Forward, backward, clip, step on our sampler's batches; no Accelerate."""
    import torch

    from fine_tune.core import data as D
    from fine_tune.core.model import example_losses
    from fine_tune.core.optim import build_optimizer

    cfg, tokenizer, _, train_ds, model = _prepare(spec, settings, out_dir)
    device = _device()
    model.to(device)
    # torch.optim.AdamW with our loop's parameter groups and kernel (fused or multi-tensor)
    optimizer = build_optimizer(model, cfg)
    probe.info["adamw_fused"] = bool(optimizer.defaults.get("fused"))
    total = cfg.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (total - s) / total))
    sampler = D.StepSampler(train_ds["length"], train_ds["n_units"], cfg.per_device_train_batch_size, 1, 1, 0,
                            cfg.seed, cfg.group_by_length)
    loader = D.StepLoader(train_ds, sampler, D.Collator(tokenizer, cfg))
    trained = model
    if settings["compile"]:
        model = torch.compile(model)
    probe.attach(model)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if settings["precision"] == "bf16" \
        else contextlib.nullcontext
    model.train()
    steps = loader.iterate(0)  # timed as "data" by the patched StepLoader.iterate, as in our loop
    for _ in range(total):
        step = next(steps)
        for batch in step.micro_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            weight, target = batch.pop("weight"), batch.pop("labels")
            with autocast():
                logits = model(**batch).logits
            loss = example_losses(logits, target, weight, cfg.task).sum() / step.units
            with probe.timed("backward"):
                loss.backward()
        with probe.timed("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        probe.step_end()
    return trained, {}


def run_ours(spec, settings, probe, out_dir):
    """What train.py does: parse the flags, run the loop."""
    from transformers import AutoModelForSequenceClassification

    from fine_tune.core.config import parse_args
    from fine_tune.core.loop import run

    run(parse_args(loop_flags(spec, settings, out_dir)))
    extra = {}
    windows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    windows = [w for w in windows if "samples_per_second" in w and w.get("step", 0) > spec["warmup_steps"]]
    if windows:  # the loop's own throughput over the timed windows (each of warmup_steps steps)
        examples = spec["warmup_steps"] * spec["batch_size"]
        extra["loop_reported_samples_per_second"] = len(windows) * examples / sum(
            examples / w["samples_per_second"] for w in windows)
        extra["loop_reported_mfu"] = statistics.mean(w["mfu"] for w in windows) if "mfu" in windows[0] else None
    final = Path(out_dir) / "final"  # --torch_compile included: compiled in place, plain weight names
    return AutoModelForSequenceClassification.from_pretrained(final), extra


def evaluate_accuracy(model, spec: dict, device) -> dict:
    """Float32 accuracy of the trained weights on the first eval_samples held-out examples."""
    import torch
    from transformers import AutoTokenizer

    from fine_tune.core.model import resolve_model_path

    rows = []
    with open(spec["eval_file"], encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= spec["eval_samples"]:
                break
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec["model"]))
    label2id = model.config.label2id
    gold = [label2id[r["label"]] if isinstance(r["label"], str) else int(r["label"]) for r in rows]
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=spec["max_length"])
    order = sorted(range(len(rows)), key=lambda i: -len(enc["input_ids"][i]))
    model = model.float().to(device).eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
            pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
            correct += sum(int(p) == gold[i] for p, i in zip(pred.tolist(), idx))
    return {"eval_accuracy": correct / len(rows), "eval_samples": len(rows)}


def worker(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    settings = spec["settings"]
    device = _device()
    split = spec["split"] == "on" or (spec["split"] == "auto" and device.type == "cpu")
    probe = Probe(spec["warmup_steps"], device, split)
    probe.target = spec["steps"]
    patch_libraries(probe)
    out_dir = spec["out_dir"]
    runner = {"trainer": run_trainer, "bare": run_bare, "ours": run_ours}[settings["runner"]]
    model, extra = runner(spec, settings, probe, out_dir)
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    result = {**probe.summary(), **probe.info, **extra, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "n_params": n_params, "n_matmul_params": n_params - embeddings, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["device_name"] = torch.cuda.get_device_name()
    result.update(evaluate_accuracy(model, spec, device))
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


def mode_label(mode: str, best: str) -> str:
    base, *opts = mode.split("+")
    label = MODES[base]
    if base == "e":
        label += f" ({', '.join(OPTIONS[o] for o in best.split(',') if o) or 'none'})"
    if opts:
        label += " + " + ", ".join(OPTIONS[o] for o in opts)
    return label


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fine-tune bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="hub id or local folder (default: %(default)s)")
    p.add_argument("--train_file", default=DEFAULT_TRAIN, help="training data (default: %(default)s)")
    p.add_argument("--eval_file", default=DEFAULT_EVAL, help="held-out data for accuracy (default: %(default)s)")
    p.add_argument("--eval_samples", type=int, default=1000, help="held-out examples scored (default: %(default)s)")
    p.add_argument("--workload", choices=WORKLOADS, default="short",
                   help="short: the training file's own texts (sentences, right for CPUs); long: consecutive "
                        "texts joined into inputs of --max_length tokens (512 for an encoder, 1024-2048 packed "
                        "for a decoder), where a GPU's arithmetic dominates; tokens/s and MFU head the report "
                        "(default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=80,
                   help="optimizer steps per run, warm-up included; each run trains on the first "
                        "steps x batch_size examples (default: %(default)s)")
    p.add_argument("--warmup_steps", type=int, default=8, help="untimed first steps (default: %(default)s)")
    p.add_argument("--max_length", type=int, default=None, help="(default: 128; 512 with --workload long)")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="(default: %(default)s)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="precision of every mode but e (default: %(default)s)")
    p.add_argument("--best", default="auto",
                   help=f"comma list of the options of mode e, from {', '.join(OPTIONS)}; auto: chosen from the "
                        "measured matrix-product peaks (bf16 only where it measured faster) (default: %(default)s)")
    p.add_argument("--modes", default="a,b,c,d,e", help="comma list of modes, each a letter with optional "
                   "+options, e.g. d+bf16 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (default: %(default)s)")
    p.add_argument("--split", choices=("auto", "on", "off"), default="auto",
                   help="time data/forward/backward/optimizer separately; auto: on for CPU, off for GPU "
                        "(there it needs a synchronisation per phase) (default: %(default)s)")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: known GPUs; on CPU a measured matrix product)")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    p.add_argument("--work_dir", default=None, help="keep the runs' output here (default: a temporary folder)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run (default: %(default)s)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def long_inputs(train_file: str, model: str, max_length: int, n_examples: int, out_path: Path) -> Path:
    """The long workload's training file: consecutive texts of ``train_file`` joined (with a
    space) until each input holds ``max_length`` tokens, so that every input is full after
    truncation; the label is the first text's. Real text, no padding: the shape a GPU user feeds
    an encoder at 512 tokens or a decoder packed to 1,024-2,048."""
    from transformers import AutoTokenizer

    from fine_tune.core.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    rows = [json.loads(line) for line in Path(train_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    out, at = [], 0
    while len(out) < n_examples and rows:
        texts, tokens, label = [], 0, rows[at % len(rows)]["label"]
        while tokens < max_length:
            text = rows[at % len(rows)]["text"]
            texts.append(text)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            at += 1
        out.append({"text": " ".join(texts), "label": label})
    out_path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return out_path


def main(argv: list[str] | None = None) -> dict:
    from fine_tune.commands import bench_report as R

    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        raise SystemExit("error: need 1 <= --warmup_steps < --steps")
    if args.max_length is None:
        args.max_length = 512 if args.workload == "long" else 128
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:  # bad modes fail before any measurement
        try:
            parse_mode(mode, "" if args.best == "auto" else args.best, args.precision)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    for path in (args.train_file, args.eval_file):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} does not exist (fine-tune prepare-data makes the default data)")
    import torch

    from fine_tune.core.loop import KNOWN_PEAK_FLOPS

    info = R.machine_info()
    on_gpu = torch.cuda.is_available()
    calibration = None
    if args.peak_flops:
        peaks = {"fp32": args.peak_flops, "bf16": args.peak_flops}
    elif on_gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)
        peaks = {"fp32": peak, "bf16": peak}
    else:
        info["cpu_features"] = R.cpu_features()
        calibration = R.calibrate()
        info["measured_matmul_flops"] = calibration
        peaks = {p: c["flops"] for p, c in calibration.items()}
    best, why = (args.best, "given") if args.best != "auto" else R.choose_best(calibration, on_gpu)
    info["best_options"] = {"options": best, "why": why}
    settings = {mode: parse_mode(mode, best, args.precision) for mode in modes}
    labels = {m: mode_label(m, best) for m in modes}

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file = str(Path(args.train_file).resolve())
    if args.workload == "long":
        train_file = str(long_inputs(train_file, args.model, args.max_length, args.steps * args.batch_size,
                                     work / "long_train.jsonl"))
    base_spec = {"model": args.model, "train_file": train_file,
                 "eval_file": str(Path(args.eval_file).resolve()), "eval_samples": args.eval_samples,
                 "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                 "max_length": args.max_length, "learning_rate": args.learning_rate,
                 "weight_decay": args.weight_decay, "seed": args.seed, "split": args.split}
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    runs = {m: [] for m in modes}
    started = time.perf_counter()
    calibrated = "" if calibration is None else "; calibration " + ", ".join(
        f"{p} {c['flops'] / 1e9:.0f} GFLOP/s at {c['n']} ({c['seconds']:.2f} s)" for p, c in calibration.items())
    print(f"benchmark: {len(modes)} modes x {args.repeats} repeats, {args.steps} steps "
          f"({args.warmup_steps} warm-up) of {args.batch_size}, max length {args.max_length}, {args.workload} "
          f"inputs; {info['cpu']}{calibrated}; e: {best or 'none'} ({why})", flush=True)
    for repeat in range(args.repeats):
        for mode in modes:
            safe = mode.replace("+", "_")
            run_dir = work / f"{safe}-{repeat}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            spec = {**base_spec, "settings": settings[mode], "out_dir": str(run_dir / "out"),
                    "result_path": str(run_dir / "result.json"),
                    "peak_flops": args.peak_flops}
            (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
            t = time.perf_counter()
            with open(run_dir / "log.txt", "w") as log:
                try:
                    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.bench", "--worker",
                                           str(run_dir / "spec.json")], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, timeout=args.timeout)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if rc == 0 and (run_dir / "result.json").exists():
                result = json.loads((run_dir / "result.json").read_text())
                peak = peaks.get(settings[mode]["precision"])
                # 6 FLOPs per weight and token (forward 2, backward 4); embeddings are lookups, not matmuls
                result["mfu"] = 6 * result["n_matmul_params"] * result["tokens_per_second"] / peak if peak else None
            else:
                tail = (run_dir / "log.txt").read_text()[-3000:]
                result = {"error": f"exit status {rc}", "log_tail": tail}
                print(f"  {mode} repeat {repeat + 1} FAILED ({rc}); log tail:\n{tail}", flush=True)
            result.update(mode=mode, repeat=repeat, wall_s=time.perf_counter() - t)
            runs[mode].append(result)
            if "error" not in result:
                print(f"  {mode} repeat {repeat + 1}: {result['samples_per_second']:.1f} samples/s, "
                      f"{result['tokens_per_second']:.0f} tokens/s, acc {result['eval_accuracy']:.3f} "
                      f"({result['wall_s']:.0f} s)", flush=True)
    summary = R.summarize(runs, modes)
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    table = R.markdown_table(summary, labels)
    print()
    if args.workload == "long":
        for line in R.headline(summary, labels):
            print(line)
        print()
    print(table)
    print()
    comparisons, notes = R.comparisons_and_notes(summary, runs, info, started)
    for n in notes:
        print(n)
    report = {"config": {**{k: v for k, v in base_spec.items() if k != "split"}, "precision": args.precision,
                         "best": best, "repeats": args.repeats, "modes": modes, "split": args.split,
                         "workload": args.workload},
              "machine": info, "peak_flops": peaks, "labels": labels, "settings": settings, "summary": summary,
              "comparisons": comparisons, "notes": notes, "table": table, "runs": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
