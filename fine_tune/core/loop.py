"""The one training loop, the same code on CPU, GPU, DDP, FSDP and DeepSpeed.

A run is four steps, the methods of :class:`TrainingRun` (which holds the run's state), that
:func:`run` calls in this order:

1. ``setup``: check every input (options, checkpoint, data, model), then build what training
   needs (accelerator, labels, tokenized data, model, optimizer, scheduler, loaders, the
   resumed state). Only at its end, once nothing can fail on bad input, is the output folder
   written.
2. ``train``: the loop itself, flat, read top to bottom: each optimizer step's micro-batches
   (forward, backward), the optimizer step, logging, and evaluation and checkpoints at their
   strategy's steps. It returns why it stopped, a :class:`StopReason`.
3. ``save``: what the run leaves, by that reason: the final evaluations, the test split and
   final/ (completed, early stopping); the last evaluation and no model (pruned by the eval
   hook); or the checkpoint that a stop signal saved (then resume).
4. ``cleanup``: release the model, the process group, the trackers and the output folder's
   lock, once, also after a failure.

:func:`run` returns a :class:`RunOutcome`; the command (``fine-tune train``, train.py) turns a
stop signal into the exit status ``EXIT_CHECKPOINTED``. What differs by task (data, head,
loss, metrics) the run's task says (fine_tune.core.tasks); the accelerator and DeepSpeed
set-up is fine_tune.core.distributed, evaluation fine_tune.core.evaluation.

Features: manual gradient accumulation whose gradient equals the gradient of the mean loss
over every unit of the optimizer step (example, labelled token, (example, label) pair for
multi-label, class weight with --class_weights), across micro-batches and processes, a short
last step included; full fine-tuning or LoRA (peft); bf16/fp16 autocast (fp16 with a gradient scaler that
skips overflowing steps); ``clip_grad_norm_`` once per optimizer step after unscaling;
schedulers stepped once per optimizer update (plateau: once per evaluation); evaluation on
predictions gathered from all processes without duplicates; best-metric tracking and early
stopping, and the best weights kept for final/ (--load_best_model_at_end); one run per
output folder (a lock), atomic results and checkpoints that hold no pickle, with exact
mid-epoch resume; signals (TERM, INT, USR1, USR2) that make every process checkpoint at the
same step (also from inside an evaluation); a failure on one process ends all of them;
an eval hook (``--eval_hook``, fine_tune.core.hooks) whose "stop" rides on the same vote, so
that every process ends at the evaluated step ("pruned", no final model).

Limits: one task per run; FSDP needs GPUs (accelerate's plugin finds no device on CPU); with
DeepSpeed the engine steps inside ``backward``, so a non-finite step under bf16/fp32 is
caught after the update (fp16 overflow is skipped by DeepSpeed's own scaler).

How the loss is scaled: each micro-batch's loss is a *sum* over its units; it is divided by
the number of units of the whole optimizer step (all ranks, known from the sampler without
communication) and multiplied by ``world_size x gradient_accumulation_steps``, because
``accelerator.backward`` (or the DeepSpeed engine) divides by the accumulation steps and the
gradient all-reduce averages over ranks. The sum of all micro-batch gradients is then the
gradient of the step's mean loss (transformers PR #34191, the bug this avoids).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fine_tune import EXIT_CHECKPOINTED
from fine_tune.core.config import TrainConfig, save_config
# KNOWN_PEAK_FLOPS and make_accelerator: also read from here by the benchmark and the tests
from fine_tune.core.distributed import KNOWN_PEAK_FLOPS, configure_deepspeed, device_peak_flops, \
    make_accelerator, peak_memory_mb  # noqa: F401
from fine_tune.core.errors import UserError
from fine_tune.core.evaluation import EvaluationInterrupted, evaluate
from fine_tune.core.hooks import load_eval_hook
from fine_tune.core.tasks import task_for


class NonFiniteError(UserError):
    pass


class StopReason(enum.Enum):
    """Why ``train`` ended; ``save`` acts on it."""
    COMPLETED = "completed"  # every step ran: final/ and the final metrics
    EARLY_STOPPING = "early stopping"  # --early_stopping_patience evaluations without improvement: as completed
    PRUNED = "pruned"  # the eval hook said stop: the last evaluation, no final model
    SIGNAL = "signal"  # a stop signal: a checkpoint is saved, resume to go on


@dataclass
class RunOutcome:
    """What a run ended with."""
    stop_reason: StopReason
    results: Optional[dict]  # the final metrics (eval_results.json); None after a stop signal
    global_step: int  # the optimizer steps done

    @property
    def checkpointed(self) -> bool:
        """Stopped by a signal after saving a checkpoint: requeue and resume."""
        return self.stop_reason is StopReason.SIGNAL


def prepare_output_dir(cfg: TrainConfig, resume_path: Path | None) -> None:
    """Make the folder tell one story before the run writes into it (main process, once every
    input is checked): a fresh start clears what it may replace (with --overwrite_output_dir, or
    an unfinished run's leftovers when 'latest' found no checkpoint); a resume from an older
    checkpoint sets the newer ones aside."""
    from fine_tune.core import checkpoint, outputs

    out = Path(cfg.output_dir)
    outputs.recover_folder(out / "final")
    if resume_path is not None and outputs.is_inside(resume_path, out):
        note = checkpoint.set_aside_newer(resume_path)
        if note:
            print(note, flush=True)
    elif cfg.overwrite_output_dir or cfg.resume_from_checkpoint == "latest":
        outputs.clear_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ the run
class TrainingRun:
    """One training run: ``setup`` -> ``train`` -> ``save`` -> ``cleanup`` (module docstring).

    ``train`` calls ``forward_backward`` and ``optimizer_step`` for each optimizer step, ``log``
    at logging steps, and ``after_step`` for evaluation and checkpoints at their strategy's steps.
    """

    def __init__(self, cfg: TrainConfig):
        from fine_tune.core.signals import install_stop_handlers

        self.cfg = cfg
        self.task = task_for(cfg)  # what differs by task: columns, labels, head, loss, metrics
        self.stop = install_stop_handlers()  # the entry point installed them already: the same object
        # set by setup
        self.accelerator = None  # accelerate.Accelerator: devices, processes, mixed precision
        self.world = 1  # number of processes
        self.lock = None  # the output folder's lock (main process), held until cleanup
        self.tokenizer = None
        self.labels = None  # labels.LabelInfo: label names, class weights
        self.extra_metrics: list = []  # the --metric metrics, computed at each evaluation
        self.train_ds = None  # the tokenized training split
        self.sampler = None  # data.StepSampler: the examples of each optimizer step, per rank
        self.train_loader = None  # data.StepLoader: the collated micro-batches of each step
        self.eval_loaders: dict = {}  # "validation"/"test" -> prepared DataLoader
        self.model = None  # the prepared model (DDP, FSDP or DeepSpeed engine around it)
        self.optimizer = None  # the prepared optimizer
        self.scheduler = None  # ours, never prepared: stepped once per optimizer update
        self.class_weights = None  # the training loss's class weights (a tensor), or None
        self.n_trainable = self.n_params = 0  # parameter counts (the start line, MFU)
        self.steps_per_epoch = 0  # optimizer steps per epoch
        self.total_steps = 0  # optimizer steps of the whole run
        self.state = None  # checkpoint.TrainState: steps, epoch, best metric; saved in checkpoints
        self.tracker = None  # tracking.Tracker: metrics.jsonl and the trackers of --report_to
        self.peak_flops = None  # the devices' peak FLOP/s (MFU), or None when unknown
        self.eval_hook = None  # --eval_hook's callable (main process only), or None
        # kept by train
        self.evals: dict[int, dict] = {}  # optimizer step -> eval metrics
        self.window_loss = None  # the loss summed on the device since the last log
        self.window: dict = {}  # units, examples, tokens and start time since the last log
        self.grad_norm = 0.0  # the last optimizer step's gradient norm
        self.where: dict = {}  # device, topology, precision: in the first training record of each start
        self.prune_requested = False  # the eval hook said stop (main process); voted at the next step
        self.pruned = False  # every rank agreed: stop before applying this step

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check every input (options, checkpoint, data, model), then build what training needs.
        Only at the end, once nothing can fail on bad input, is the output folder written."""
        from accelerate.utils import set_seed

        from fine_tune.core import checkpoint
        from fine_tune.core.metrics import load_extra_metric
        from fine_tune.core.model import check_model_options, load_tokenizer
        from fine_tune.core.outputs import claim_output_dir

        cfg = self.cfg
        hook_factory = load_eval_hook(cfg.eval_hook)
        self.accelerator = accelerator = make_accelerator(cfg)
        self.world = accelerator.num_processes
        self.lock = claim_output_dir(accelerator, cfg)  # one run per folder, and every rank sees it
        resume_path = checkpoint.choose_resume(accelerator, cfg)  # rank 0's choice, for every rank
        check_model_options(cfg, self.task)
        set_seed(cfg.seed)
        self.extra_metrics = [load_extra_metric(m) for m in cfg.extra_metric_names]
        self.tokenizer = load_tokenizer(cfg, self.task)
        timings = {}  # seconds per start-up part
        tokenized = self.setup_data(timings)
        self.setup_training(self.setup_model(timings), tokenized)
        self.setup_state(resume_path)
        self.setup_outputs(resume_path, timings)
        self.eval_hook = hook_factory(cfg) if hook_factory is not None and accelerator.is_main_process else None

    def setup_data(self, timings: dict) -> dict:
        """Read the splits, the labels (of the whole training split, checked over whole columns
        on one process) and tokenize. Returns the tokenized splits."""
        from fine_tune.core import data
        from fine_tune.core.metrics import extra_metric_outputs
        from fine_tune.core.ranks import computed_on_main

        cfg, task = self.cfg, self.task

        def read():
            splits = data.load_raw_splits(cfg)
            if "train" not in splits:
                raise UserError("no training data: give --train_file or a --dataset_name with a train split")
            return splits

        splits = self.on_each_process(read, "while loading the data", timings, "reading")
        started = time.perf_counter()
        self.labels = computed_on_main(self.accelerator, lambda: task.infer_labels(splits, cfg),
                                       "while checking the labels")
        timings["labels"] = time.perf_counter() - started
        splits = data.select_train_samples(splits, cfg)
        tokenized = self.on_each_process(lambda: data.tokenize_splits(splits, self.tokenizer, cfg, self.labels, task),
                                         "while tokenizing the data", timings, "tokenizing")
        cfg.check_metric_for_best_model(self.labels.names, extra_metric_outputs(self.extra_metrics, task))
        self.train_ds = tokenized["train"]
        if len(self.train_ds) < self.world:
            raise UserError(f"{len(self.train_ds)} training examples cannot feed {self.world} processes; "
                            "use fewer processes or more data")
        return tokenized

    def setup_model(self, timings: dict):
        """The task's model (LoRA-wrapped with --use_peft), not yet prepared."""
        import torch

        from fine_tune.core.model import load_model, parameter_counts

        started = time.perf_counter()
        model = load_model(self.cfg, self.labels, self.tokenizer, self.task)
        timings["model"] = time.perf_counter() - started
        self.n_trainable, self.n_params = parameter_counts(model)
        # the training loss's class weights (evaluation reports the plain loss: unweighted, unsmoothed)
        self.class_weights = None if self.labels.class_weights is None else \
            torch.tensor(self.labels.class_weights, device=self.accelerator.device)
        return model

    def setup_training(self, model, tokenized: dict) -> None:
        """Optimizer, step sampler and loaders, scheduler; then the model, optimizer and
        evaluation loaders prepared by the accelerator."""
        import torch

        from fine_tune.core import data, fsdp
        from fine_tune.core.optim import build_optimizer, build_scheduler

        cfg, accelerator = self.cfg, self.accelerator
        optimizer = build_optimizer(model, cfg)
        self.sampler = data.StepSampler(self.train_ds["length"], self.train_ds["n_units"],
                                        cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, self.world,
                                        accelerator.process_index, cfg.seed, cfg.group_by_length)
        collator = data.Collator(self.tokenizer, cfg, self.task)
        self.train_loader = data.StepLoader(self.train_ds, self.sampler, collator, cfg.dataloader_num_workers)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(optimizer, cfg, self.total_steps)

        configure_deepspeed(accelerator, cfg)
        fsdp.configure_fsdp(accelerator, model)  # FSDP units: the repeated blocks, each module sharded once
        if cfg.torch_compile:
            model.compile()  # in place (nn.Module.compile): weight names, checkpoints and final/ stay the model's own
        eval_loaders = {split: data.eval_dataloader(tokenized[split], collator, cfg.per_device_eval_batch_size)
                        for split in ("validation", "test") if split in tokenized}
        # the scheduler is ours and never prepared (accelerate would step it once per process);
        # the train batches come from our StepSampler, so only evaluation loaders are prepared
        self.model, self.optimizer, *prepared = accelerator.prepare(model, optimizer, *eval_loaders.values())
        self.eval_loaders = dict(zip(eval_loaders, prepared))
        if cfg.load_best and "validation" not in self.eval_loaders:
            raise UserError("--load_best_model_at_end needs a validation split to pick the best weights: give "
                            "--validation_file, or a --validation_split_percentage above 0")

    def setup_state(self, resume_path: Path | None) -> None:
        """A fresh training state, or the checkpoint's (weights, optimizer, scheduler, RNG, step)."""
        from fine_tune.core import checkpoint, data

        accelerator = self.accelerator
        self.state = state = checkpoint.TrainState(world_size=self.world)
        checkpoint.save_trainable_weights_only(accelerator)  # LoRA: checkpoints hold what trains
        if resume_path is not None:
            checkpoint.load_checkpoint(accelerator, resume_path, state, self.scheduler)
            accelerator.print(f"resumed from {resume_path} at step {state.global_step} "
                              f"(epoch {state.epoch}, step {state.step_in_epoch} of {self.steps_per_epoch})")
        state.data_fingerprint = data.data_fingerprint(self.cfg)  # what the checkpoints of this run were trained on

    def setup_outputs(self, resume_path: Path | None, timings: dict) -> None:
        """Every input (data, model, checkpoint) is checked by now: only from here on is the output
        directory written, so a failed start never damages an earlier run. Then the tracker."""
        from fine_tune.core import checkpoint
        from fine_tune.core.tracking import Tracker, truncate_metrics

        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        if accelerator.is_main_process:
            prepare_output_dir(cfg, resume_path)
            if resume_path is not None:
                truncate_metrics(Path(cfg.output_dir) / "metrics.jsonl", state.global_step)
            elif cfg.resume_from_checkpoint == "latest":
                accelerator.print(f"no checkpoint in {checkpoint.checkpoints_dir(cfg.output_dir)} yet: "
                                  "starting fresh")
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        accelerator.wait_for_everyone()
        run_config = {**cfg.to_dict(), "world_size": self.world, "distributed_type": str(accelerator.distributed_type),
                      "n_params": self.n_params, "n_trainable_params": self.n_trainable,
                      "steps_per_epoch": self.steps_per_epoch,
                      "total_steps": self.total_steps,
                      # seconds per start-up part: where a slow start goes (reading, labels, tokenizing, model)
                      "startup_seconds": {k: round(v, 3) for k, v in timings.items()}}
        accelerator.print("start-up: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in timings.items()))
        self.tracker = Tracker(accelerator, cfg, state, run_config)
        self.peak_flops = device_peak_flops(cfg)

    def on_each_process(self, work, stage: str, timings: dict, part: str):
        """``work()`` on every process, the main one first (the others then read what it cached);
        a failure on any process ends them all, each showing the failing one's error."""
        from fine_tune.core.ranks import peer_lost, raise_if_any_failed

        accelerator, result, error = self.accelerator, None, None
        started = time.perf_counter()
        try:
            with accelerator.main_process_first():
                try:
                    result = work()
                except Exception as e:  # noqa: BLE001 - leave the block: the other ranks wait at its barrier
                    error = e
        except Exception as e:  # noqa: BLE001 - its barrier: a process died, or did not come in time
            raise (error or peer_lost(accelerator, e, stage)) from None
        raise_if_any_failed(accelerator, error, stage)
        timings[part] = time.perf_counter() - started
        return result

    # ---------------------------------------------------------------- train
    def train(self) -> StopReason:
        """The training loop. Returns why it stopped."""
        import torch
        from tqdm.auto import tqdm

        from fine_tune.core.model import describe_parameters
        from fine_tune.core.topology import describe_run

        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        where = describe_run(accelerator, cfg.mixed_precision)  # device, topology, precision in words
        accelerator.print(
            f"training {cfg.model_name_or_path} ({describe_parameters(self.n_trainable, self.n_params)}) on "
            f"{len(self.train_ds)} examples: {self.total_steps} optimizer steps of {self.sampler.global_batch} examples "
            f"({self.world} process(es) x {cfg.per_device_train_batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation), {', '.join(where.values())}")
        self.where = where  # metrics.jsonl: in the first training record of this start
        self.model.train()
        self.window_loss = torch.zeros((), device=accelerator.device)  # summed on the device, read only when logging
        self.window = {"units": 0, "examples": 0, "tokens": 0, "time": time.perf_counter()}
        progress = tqdm(total=self.total_steps, initial=state.global_step, desc="training", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process or cfg.disable_tqdm)
        stop_reason = self.pending_evaluation()
        while state.global_step < self.total_steps and stop_reason is None:
            for step in self.train_loader.iterate(state.epoch, state.step_in_epoch):
                self.forward_backward(step)
                stop_votes = self.optimizer_step()
                if self.pruned:
                    stop_reason = StopReason.PRUNED
                    break
                state.global_step += 1
                state.step_in_epoch += 1
                self.window["units"] += step.units
                self.window["examples"] += step.examples
                self.window["tokens"] += step.tokens
                progress.update(1)

                if state.global_step % cfg.logging_steps == 0 or state.global_step == self.total_steps:
                    self.log(progress)
                stop_reason = self.after_step(stop_votes)
                if state.global_step >= self.total_steps or stop_reason:
                    break
        progress.close()
        return stop_reason or StopReason.COMPLETED

    def pending_evaluation(self) -> StopReason | None:
        """A stop signal interrupted this step's evaluation before the resume: it comes first."""
        cfg, state = self.cfg, self.state
        if not state.pending_eval:
            return None
        state.pending_eval = False
        if not self.validate_unless_stopped():
            self.save_checkpoint()
            return StopReason.SIGNAL
        if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
            return StopReason.EARLY_STOPPING
        return None

    def forward_backward(self, step) -> None:
        """The micro-batches of one optimizer step: forward, loss, backward; the gradients are
        all-reduced on the last micro-batch only."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        device = accelerator.device
        # see the module docstring: backward divides by the accumulation steps and the all-reduce
        # averages over ranks; this undoes both so the step's gradient is that of its mean loss
        loss_scale = self.world * accelerator.gradient_accumulation_steps
        micro_batches = step.micro_batches
        for j, batch in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            weight, target = batch.pop("weight"), batch.pop("labels")
            accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                logits = model(**batch, **self.task.forward_options).logits
                local = self.task.example_losses(logits, target, weight, self.class_weights,
                                                 cfg.label_smoothing_factor).sum()
                # a step without any loss unit (every target cut off by --max_length) has a zero loss
                accelerator.backward(local * (loss_scale / (step.units or 1.0)))
            self.window_loss += local.detach()

    def after_step(self, stop_votes: float) -> StopReason | None:
        """After an optimizer step: evaluate and checkpoint at their strategy's steps (a checkpoint
        also on a stop signal, and of each new best with --load_best_model_at_end, so that the best
        weights are always on disk to load at the end). Returns why the run stops here, if it does."""
        cfg, state = self.cfg, self.state
        stop_reason = None
        end_of_epoch = state.step_in_epoch >= self.steps_per_epoch
        new_best = False
        if "validation" in self.eval_loaders and (
                (cfg.eval_strategy == "steps" and state.global_step % cfg.eval_steps == 0)
                or (cfg.eval_strategy == "epoch" and end_of_epoch)):
            result = self.validate_unless_stopped()
            if result is None:
                stop_votes = 1
            else:
                new_best = state.best_step == state.global_step
                if self.eval_hook is not None:  # the evaluation's number is the same after a resume
                    number = state.global_step // cfg.eval_steps if cfg.eval_strategy == "steps" \
                        else state.epoch + 1
                    self.prune_requested = bool(self.eval_hook(state.global_step, number, result))
            if cfg.early_stopping_patience and \
                    state.evals_without_improvement >= cfg.early_stopping_patience:
                stop_reason = StopReason.EARLY_STOPPING
        if end_of_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if stop_votes > 0:
            stop_reason = StopReason.SIGNAL
        if (cfg.save_strategy == "steps" and state.global_step % cfg.save_steps == 0) or \
                (cfg.save_strategy == "epoch" and end_of_epoch) or stop_reason is StopReason.SIGNAL or \
                (new_best and cfg.load_best):
            self.save_checkpoint()
        return stop_reason

    def optimizer_step(self) -> float:
        """The optimizer-step boundary: clip once, step once, schedule once, and the one host
        synchronisation of the step. Returns the number of ranks that asked to stop on a signal;
        sets ``pruned`` (and applies nothing) when the eval hook asked to stop at the last step."""
        import torch

        from fine_tune.core.optim import is_plateau

        cfg, accelerator, optimizer, scheduler, state = \
            self.cfg, self.accelerator, self.optimizer, self.scheduler, self.state

        if accelerator.state.deepspeed_plugin is not None:
            # the engine clipped and stepped inside backward; this reads the norm
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        else:  # unscales (fp16) first; max_norm inf only measures
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
        # Stop requests: every rank must agree, so the flag is all-reduced. It travels with the
        # gradient norm: one host-device synchronisation per optimizer step, not more.
        device = accelerator.device
        stop_flag = torch.tensor([0.0 if self.stop.signum is None else 1.0, float(self.prune_requested)],
                                 device=device)
        if self.world > 1:
            stop_flag = accelerator.reduce(stop_flag, reduction="sum")
        norm_value = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=device).float()
        self.grad_norm, stop_votes, prune_votes = torch.cat([norm_value.reshape(1), stop_flag]).tolist()
        if prune_votes > 0:  # the run ends at the step that was evaluated; this one is dropped
            optimizer.zero_grad(set_to_none=True)
            self.pruned = True
            return stop_votes
        if not math.isfinite(self.grad_norm) and not accelerator.scaler:
            state.nonfinite_steps += 1
            optimizer.zero_grad(set_to_none=True)
            accelerator.print(f"step {state.global_step + 1}: non-finite gradient norm, update skipped "
                              f"({state.nonfinite_steps} in a row)")
            if state.nonfinite_steps > cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"training stopped: {state.nonfinite_steps} consecutive optimizer steps with a non-finite "
                    f"loss or gradient (allowed: --max_nonfinite_steps {cfg.max_nonfinite_steps}). Lower "
                    "--learning_rate, use bf16 instead of fp16, or check the data; the last checkpoint is intact")
            return stop_votes
        state.nonfinite_steps = 0
        optimizer.step()
        if accelerator.optimizer_step_was_skipped:
            state.skipped_steps += 1
            accelerator.print(f"step {state.global_step + 1}: fp16 overflow, the scaler skipped this update "
                              f"({state.skipped_steps} skipped so far)")
        elif not is_plateau(scheduler):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return stop_votes

    def log(self, progress) -> None:
        """Training metrics of the steps since the last log: the only place the loss is read back
        from the device."""
        window = self.window
        loss = float(self.accelerator.reduce(self.window_loss, reduction="sum")) / max(window["units"], 1)
        elapsed = time.perf_counter() - window["time"]
        tokens_per_s = window["tokens"] / elapsed
        event = {"loss": loss, "learning_rate": self.optimizer.param_groups[0]["lr"], "grad_norm": self.grad_norm,
                 "samples_per_second": window["examples"] / elapsed, "tokens_per_second": tokens_per_s,
                 **peak_memory_mb(), **self.where}
        self.where = {}
        if self.peak_flops:
            # per token: 2N forward, 2N backward through the activations, 2N' for the weight
            # gradients of the N' trainable parameters (6N in a full fine-tune)
            flops_per_token = 4 * self.n_params + 2 * self.n_trainable
            event["mfu"] = flops_per_token * tokens_per_s / (self.peak_flops * self.world)
        self.log_event(event)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{event['learning_rate']:.2e}")
        self.window_loss.zero_()
        window.update(units=0, examples=0, tokens=0, time=time.perf_counter())

    def log_event(self, metrics: dict) -> None:
        state = self.state
        self.tracker.log({"epoch": round(state.epoch + state.step_in_epoch / self.steps_per_epoch, 4), **metrics},
                         state.global_step)

    # ---------------------------------------------------------------- evaluate
    def evaluate_split(self, split: str, stop=None) -> dict:
        """Loss and the task's metrics on ``split`` (a stop signal ends it when ``stop`` is given)."""
        return evaluate(self.model, self.eval_loaders[split], self.accelerator, self.task, self.labels, self.cfg,
                        self.extra_metrics, stop)

    def validate(self) -> dict:
        """Evaluate on the validation split; track the best metric; step a plateau scheduler."""
        from fine_tune.core.optim import is_plateau

        cfg, state = self.cfg, self.state
        result = {f"eval_{k}": v for k, v in self.evaluate_split("validation", self.stop).items()}
        self.log_event(result)
        value = result.get(cfg.best_metric)
        if value is None:
            raise UserError(f"--metric_for_best_model {cfg.metric_for_best_model or cfg.best_metric}: no such "
                            f"eval metric; available: {', '.join(sorted(result))}")
        better = state.best_metric is None or (value > state.best_metric if cfg.best_is_greater
                                               else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
        else:
            state.evals_without_improvement += 1
        if is_plateau(self.scheduler):
            self.scheduler.step(value)
        shown = [k for k in ("eval_loss", "eval_accuracy", "eval_f1_weighted", "eval_f1_micro", "eval_f1_macro",
                             "eval_f1",
                             "eval_mse", "eval_pearson") if k in result]
        self.accelerator.print(f"step {state.global_step}: " + ", ".join(f"{k} {result[k]:.4f}" for k in shown))
        self.evals[state.global_step] = result
        return result

    def validate_unless_stopped(self) -> dict | None:
        """Validate; None if a stop signal interrupted it (it then runs first on resume)."""
        try:
            return self.validate()
        except EvaluationInterrupted:
            self.state.pending_eval = True
            self.accelerator.print(f"evaluation of step {self.state.global_step} interrupted by the stop request; "
                                   "it runs first on resume")
            return None

    # ---------------------------------------------------------------- save
    def save_checkpoint(self) -> Path:
        from fine_tune.core import checkpoint

        return checkpoint.save_checkpoint(self.accelerator, self.cfg, self.state, self.scheduler)

    def load_best_model(self) -> int:
        """With --load_best_model_at_end, put the best evaluation's weights back (from its
        checkpoint, which rotation keeps). Returns the step whose weights the model now holds."""
        from fine_tune.core import checkpoint
        from fine_tune.core.outputs import on_main

        cfg, state = self.cfg, self.state
        if not cfg.load_best or state.best_step is None or state.best_step == state.global_step:
            return state.global_step
        best = checkpoint.checkpoints_dir(cfg.output_dir) / f"step_{state.best_step}"
        on_main(self.accelerator, lambda: checkpoint.verify_manifest(best))
        checkpoint.load_checkpoint(self.accelerator, best, checkpoint.TrainState())  # weights; this run's state stays
        self.accelerator.print(f"loaded the best model (step {state.best_step}, {cfg.best_metric} "
                               f"{state.best_metric:.4f}) for final/ and the test metrics")
        return state.best_step

    def save_final(self) -> dict:
        """The last evaluation (unless this step was just evaluated), the test split, and
        final/: the model and tokenizer that `transformers.pipeline` loads (and final/adapter/ with LoRA).
        With --load_best_model_at_end all three come from the best evaluation's weights."""
        from fine_tune.core.model import save_final
        from fine_tune.core.outputs import replace_folder, write_atomic

        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        results = {}
        model_step = self.load_best_model()
        if "validation" in self.eval_loaders:
            if model_step not in self.evals and model_step == state.global_step:
                self.validate()
            elif model_step not in self.evals:  # the best evaluation came before a resume: evaluate it again
                self.evals[model_step] = {f"eval_{k}": v for k, v in self.evaluate_split("validation").items()}
            results.update(self.evals[model_step])
        if "test" in self.eval_loaders:
            test = {f"test_{k}": v for k, v in self.evaluate_split("test", self.stop).items()}
            self.log_event(test)
            results.update(test)
        final_dir = Path(cfg.output_dir) / "final"
        state_dict = accelerator.get_state_dict(self.model)  # on every rank: ZeRO-3 gathers the shards here
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)
            # built beside the old final/, swapped in once complete
            replace_folder(final_dir, lambda folder: save_final(unwrapped, state_dict, folder, self.tokenizer))
            results.update({"global_step": state.global_step, "best_metric": state.best_metric,
                            "best_step": state.best_step, "metric_for_best_model": cfg.best_metric,
                            "load_best_model_at_end": cfg.load_best, "final_model_step": model_step})
            write_atomic(Path(cfg.output_dir) / "eval_results.json", json.dumps(results, indent=2))
            shown = {k: round(v, 4) for k, v in results.items() if isinstance(v, float)}
            accelerator.print("final metrics: " + json.dumps(shown))
            accelerator.print(f"model saved to {final_dir}")
        accelerator.wait_for_everyone()
        return results

    def save_pruned(self) -> dict:
        """A run the eval hook stopped: its last evaluation in eval_results.json with
        ``"status": "pruned"``; no final model. Every rank says where it stopped."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        print(f"pruned at step {state.global_step} by the eval hook (process {accelerator.process_index} of "
              f"{self.world}): no final model", flush=True)
        results = {"status": "pruned", **self.evals.get(state.global_step, {}), "global_step": state.global_step,
                   "best_metric": state.best_metric, "best_step": state.best_step,
                   "metric_for_best_model": cfg.best_metric}
        if accelerator.is_main_process:
            from fine_tune.core.outputs import write_atomic

            write_atomic(Path(cfg.output_dir) / "eval_results.json", json.dumps(results, indent=2))
        accelerator.wait_for_everyone()
        return results


    def save(self, stop_reason: StopReason) -> RunOutcome:
        """What the run leaves, by why it stopped: final/ and the final metrics (completed, early
        stopping); the last evaluation and no model (pruned); the checkpoint a stop signal saved.
        A stop signal during the final evaluations checkpoints too: they run on resume."""
        results = None
        if stop_reason is StopReason.PRUNED:
            results = self.save_pruned()
        elif stop_reason is not StopReason.SIGNAL:
            try:
                results = self.save_final()
            except EvaluationInterrupted:
                self.accelerator.print("final evaluation interrupted by the stop request")
                self.save_checkpoint()
                stop_reason = StopReason.SIGNAL
        if stop_reason is StopReason.SIGNAL:
            from fine_tune.core.checkpoint import latest_checkpoint

            self.accelerator.print(
                f"stopped by a signal at step {self.state.global_step}: checkpoint saved in "
                f"{latest_checkpoint(self.cfg.output_dir)}; rerun with --resume_from_checkpoint latest "
                f"(exit status {EXIT_CHECKPOINTED})")
        return RunOutcome(stop_reason=stop_reason, results=results, global_step=self.state.global_step)

    # ---------------------------------------------------------------- cleanup
    def cleanup(self, failed: bool = False) -> None:
        """Release what the run holds, once: the model, optimizer and loaders before the process
        group (gloo processes otherwise abort at exit now and then: 'terminate called without an
        active exception'), then the trackers and the process group, and last the output folder's
        lock. After a failure only the lock: the run has ended, and the folder is free."""
        lock, accelerator, self.lock = self.lock, self.accelerator, None
        try:
            if not failed and accelerator is not None:
                for name in ("model", "optimizer", "scheduler", "train_loader", "eval_loaders", "train_ds",
                             "sampler", "window_loss", "class_weights", "tracker", "eval_hook"):
                    setattr(self, name, None)
                accelerator.free_memory()
                gc.collect()
                accelerator.end_training()  # closes the trackers (main process) and the process group
        finally:
            if lock is not None:
                lock.release()


def run(cfg: TrainConfig) -> RunOutcome:
    """One training run: setup -> train -> save -> cleanup. Returns its outcome (final metrics,
    ``"status": "pruned"`` when the eval hook stopped it, or a stop signal's checkpoint); the
    caller turns a stop signal into ``EXIT_CHECKPOINTED``."""
    training = TrainingRun(cfg)
    try:
        training.setup()
        outcome = training.save(training.train())
    except BaseException:
        training.cleanup(failed=True)
        raise
    training.cleanup()
    return outcome
