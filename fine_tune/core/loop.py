"""The one training loop: setup -> train -> finish -> cleanup, the same code on CPU, GPU, DDP,
FSDP and DeepSpeed. :class:`TrainingRun` holds the run's state; :func:`run` drives it.

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
same step (also from inside an evaluation) and exit with ``EXIT_CHECKPOINTED``; a failure on
one process ends all of them;
an eval hook (``--eval_hook``, fine_tune.core.hooks) whose "stop" rides on the same vote, so
that every process ends at the evaluated step ("pruned", no final model).

Limits: one task per run (single- or multi-label classification, token classification or
regression); FSDP needs GPUs (accelerate's plugin finds no device on CPU); with
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
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

from fine_tune import EXIT_CHECKPOINTED
from fine_tune.core.config import TrainConfig, save_config
from fine_tune.core.errors import UserError
from fine_tune.core.hooks import load_eval_hook
from fine_tune.core.tasks import task_for

KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                    "L4": 121e12, "V100": 125e12, "T4": 65e12}  # dense bf16/fp16 tensor-core peaks


class NonFiniteError(UserError):
    pass


# ------------------------------------------------------------------ setup helpers
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def make_accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator

    from fine_tune.core.ranks import process_group_kwargs

    use_deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED")
    has_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed and _env_true("ACCELERATE_USE_CPU"):
        raise UserError("DeepSpeed cannot be combined with use_cpu/--cpu (accelerate would silently fall back "
                        "to plain DDP); remove use_cpu from the accelerate config")
    if _env_true("ACCELERATE_USE_FSDP") and not has_gpu:
        raise UserError("FSDP through accelerate needs GPUs (accelerate's FSDP plugin finds no device on CPU); "
                        "on CPU use accelerate_configs/cpu_ddp.yaml or a DeepSpeed ZeRO config")
    if cfg.mixed_precision == "fp16" and not has_gpu:
        raise UserError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 (or no)")
    # gloo is the CPU backend; without it accelerate and DeepSpeed disagree on the world size.
    # --ddp_timeout bounds every collective: a process that died or hangs ends the run.
    handlers = [process_group_kwargs(cfg, backend="gloo" if not has_gpu and world > 1 else None)]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=not has_gpu and not use_deepspeed,
        # no log_with: the trackers are ours (fine_tune.core.tracking), appended to accelerator.trackers
        kwargs_handlers=handlers,
    )
    seen = accelerator.num_processes
    expected = cfg.expected_world_size or world
    if seen != expected:
        raise UserError(f"the launcher asked for {expected} processes but this process sees a world of {seen}; "
                        "on CPU use accelerate_configs/cpu_ddp.yaml (MULTI_CPU and --cpu start one process)")
    return accelerator


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Our flags are the one source of truth: write them into DeepSpeed's config before prepare."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * \
        accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {**(ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}),
                  "enabled": cfg.mixed_precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else ZeRO-3 saves empty weights


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


def peak_memory_mb() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def device_peak_flops(cfg: TrainConfig):
    import torch

    if cfg.peak_flops:
        return cfg.peak_flops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)
    return None


class EvaluationInterrupted(Exception):
    """A stop signal arrived during an evaluation: it is abandoned (and redone on resume)."""


def stop_requested_anywhere(stop, accelerator) -> bool:
    """Whether any process got a stop signal (all-reduced, so all processes answer alike)."""
    if accelerator.num_processes == 1:
        return stop.requested
    import torch

    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")[0]) > 0


# ------------------------------------------------------------------ evaluation
def evaluate(model, loader, accelerator, cfg: TrainConfig, labels, extra_metrics=(), stop=None) -> dict:
    """Loss and metrics over the whole loader, each example counted once on any world size.
    With ``stop``, a stop signal on any process ends it (EvaluationInterrupted) at the next batch."""
    import numpy as np
    import torch

    from fine_tune.core import metrics as M
    from fine_tune.core.model import example_losses

    model.eval()
    losses, units, preds, golds = [], [], [], []
    no_grad = torch.no_grad() if accelerator.state.deepspeed_plugin else torch.inference_mode()
    with no_grad:
        for batch in loader:
            if stop is not None and stop_requested_anywhere(stop, accelerator):
                model.train()
                raise EvaluationInterrupted
            weight, target = batch.pop("weight"), batch.pop("labels")
            logits = model(**batch).logits
            # per-example loss sums and unit counts, so that gather_for_metrics can drop duplicates
            n = target.shape[0]
            per_example = example_losses(logits, target, weight, cfg.task)
            if cfg.task == "token-classification":
                count = (target != -100).sum(-1).float()
                pred = logits.argmax(-1)
                pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
                target = accelerator.pad_across_processes(target, dim=1, pad_index=-100)
            elif cfg.task == "regression":
                count, pred = torch.ones(n, device=logits.device), logits.squeeze(-1).float()
            elif cfg.task == "multi-label-classification":  # a loss unit per (example, label) pair
                count, pred = torch.full((n,), float(target.shape[1]), device=logits.device), logits.float().sigmoid()
            else:
                count, pred = torch.ones(n, device=logits.device), logits.argmax(-1)
            per_example, count, pred, target = accelerator.gather_for_metrics((per_example, count, pred, target))
            losses.append(per_example.float().cpu())
            units.append(count.cpu())
            preds.append(pred.cpu())
            golds.append(target.cpu())
    model.train()
    total_units = float(torch.cat(units).sum())
    result = {"loss": float(torch.cat(losses).sum()) / max(total_units, 1.0),
              "samples": sum(len(u) for u in units)}  # each example once, whatever the world size
    if cfg.task == "token-classification":
        width = max(p.shape[1] for p in preds)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-100)  # noqa: E731
        p_all, g_all = torch.cat([pad(p) for p in preds]).numpy(), torch.cat([pad(g) for g in golds]).numpy()
        names = labels.names
        pred_tags = [[names[p] for p, g in zip(pr, gr) if g != -100] for pr, gr in zip(p_all, g_all)]
        true_tags = [[names[g] for g in gr if g != -100] for gr in g_all]
        result.update(M.entity_metrics(pred_tags, true_tags, names))
        flat_p, flat_g = [], []
        for pr, gr in zip(p_all, g_all):
            mask = gr != -100
            flat_p.extend(pr[mask]), flat_g.extend(gr[mask])
        p_arr, g_arr = np.array(flat_p), np.array(flat_g)
    elif cfg.task == "regression":
        p_arr, g_arr = torch.cat(preds).numpy(), torch.cat(golds).float().numpy()
        result.update(M.regression_metrics(p_arr, g_arr))
    elif cfg.task == "multi-label-classification":
        scores, g_arr = torch.cat(preds).numpy(), torch.cat(golds).numpy().astype(int)
        result.update(M.multilabel_metrics(scores, g_arr, labels.names, cfg.multilabel_threshold))
        p_arr = (scores >= cfg.multilabel_threshold).astype(int)
    else:
        p_arr, g_arr = torch.cat(preds).numpy(), torch.cat(golds).numpy()
        result.update(M.classification_metrics(p_arr, g_arr, labels.num_labels))
    for metric in extra_metrics:
        computed = metric.compute(predictions=p_arr.tolist(), references=g_arr.tolist())
        result.update({f"{metric.name}_{k}" if k in result else k: v for k, v in computed.items()
                       if isinstance(v, (int, float))})
    return result


# ------------------------------------------------------------------ the run
class TrainingRun:
    """One training run as a lifecycle: ``setup`` -> ``train`` -> ``finish`` (or ``checkpoint``
    on a stop signal) -> ``cleanup``. :func:`run` calls them in that order.

    ``train`` is the loop itself, flat, read top to bottom; it calls ``optimizer_step`` at each
    optimizer-step boundary, ``log`` at logging steps, ``evaluate`` and ``save_checkpoint`` at
    their strategy's steps.
    """

    def __init__(self, cfg: TrainConfig):
        from fine_tune.core.signals import install_stop_handlers

        self.cfg = cfg
        self.stop = install_stop_handlers()  # the entry point installed them already: the same object
        self.evals: dict[int, dict] = {}  # optimizer step -> eval metrics
        self.lock = None  # the output folder's lock (main process), held for the run's life
        self.prune_requested = False  # the eval hook said stop (main process); voted at the next step
        self.pruned = False  # every rank agreed: stop before applying this step

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check every input (options, checkpoint, data, model), then build what training needs.
        Only at the end, once nothing can fail on bad input, is the output folder written."""
        import torch
        from accelerate.utils import set_seed

        from fine_tune.core import checkpoint, data
        from fine_tune.core.metrics import extra_metric_outputs, load_extra_metric
        from fine_tune.core.model import check_model_options, load_model, load_tokenizer, parameter_counts
        from fine_tune.core.optim import build_optimizer, build_scheduler
        from fine_tune.core.outputs import claim_output_dir
        from fine_tune.core.ranks import computed_on_main, injected_data_fault
        from fine_tune.core.tracking import Tracker, truncate_metrics

        cfg = self.cfg
        hook_factory = load_eval_hook(cfg.eval_hook)
        self.accelerator = accelerator = make_accelerator(cfg)
        self.world = world = accelerator.num_processes
        self.lock = claim_output_dir(accelerator, cfg)  # one run per folder, and every rank sees it
        resume_path = checkpoint.choose_resume(accelerator, cfg)  # rank 0's choice, for every rank
        check_model_options(cfg)
        set_seed(cfg.seed)
        self.extra_metrics = [load_extra_metric(m) for m in cfg.extra_metric_names]

        self.tokenizer = load_tokenizer(cfg)
        timings = {}

        def read():
            injected_data_fault()
            splits = data.load_raw_splits(cfg)
            if "train" not in splits:
                raise UserError("no training data: give --train_file or a --dataset_name with a train split")
            return splits

        splits = self.on_each_process(read, "while loading the data", timings, "reading")
        # the labels of the whole training split, checked over whole columns on one process
        started = time.perf_counter()
        self.labels = computed_on_main(accelerator, lambda: data.infer_labels(splits, cfg),
                                       "while checking the labels")
        timings["labels"] = time.perf_counter() - started
        splits = data.select_train_samples(splits, cfg)
        tokenized = self.on_each_process(lambda: data.tokenize_splits(splits, self.tokenizer, cfg, self.labels),
                                         "while tokenizing the data", timings, "tokenizing")
        cfg.check_metric_for_best_model(self.labels.names, extra_metric_outputs(self.extra_metrics, task_for(cfg)))
        self.train_ds = train_ds = tokenized["train"]
        if len(train_ds) < world:
            raise UserError(f"{len(train_ds)} training examples cannot feed {world} processes; "
                            "use fewer processes or more data")
        started = time.perf_counter()
        model = load_model(cfg, self.labels, self.tokenizer)
        timings["model"] = time.perf_counter() - started
        self.n_trainable, self.n_params = parameter_counts(model)
        # the training loss's class weights (evaluation reports the plain loss: unweighted, unsmoothed)
        self.class_weights = None if self.labels.class_weights is None else \
            torch.tensor(self.labels.class_weights, device=accelerator.device)
        optimizer = build_optimizer(model, cfg)

        self.sampler = data.StepSampler(train_ds["length"], train_ds["n_units"], cfg.per_device_train_batch_size,
                                        cfg.gradient_accumulation_steps, world, accelerator.process_index, cfg.seed,
                                        cfg.group_by_length)
        collator = data.Collator(self.tokenizer, cfg)
        self.train_loader = data.StepLoader(train_ds, self.sampler, collator, cfg.dataloader_num_workers)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(optimizer, cfg, self.total_steps)

        configure_deepspeed(accelerator, cfg)
        if cfg.torch_compile:
            model = torch.compile(model)
        eval_loaders = {split: data.eval_dataloader(tokenized[split], collator, cfg.per_device_eval_batch_size)
                        for split in ("validation", "test") if split in tokenized}
        # the scheduler is ours and never prepared (accelerate would step it once per process);
        # the train batches come from our StepSampler, so only evaluation loaders are prepared
        self.model, self.optimizer, *prepared = accelerator.prepare(model, optimizer, *eval_loaders.values())
        self.eval_loaders = dict(zip(eval_loaders, prepared))
        if cfg.load_best and "validation" not in self.eval_loaders:
            raise UserError("--load_best_model_at_end needs a validation split to pick the best weights: give "
                            "--validation_file, or a --validation_split_percentage above 0")
        self.state = state = checkpoint.TrainState(world_size=world)
        checkpoint.save_trainable_weights_only(accelerator)  # LoRA: checkpoints hold what trains
        if resume_path is not None:
            checkpoint.load_checkpoint(accelerator, resume_path, state, self.scheduler)
            accelerator.print(f"resumed from {resume_path} at step {state.global_step} "
                              f"(epoch {state.epoch}, step {state.step_in_epoch} of {self.steps_per_epoch})")
        state.data_fingerprint = data.data_fingerprint(cfg)  # what the checkpoints of this run were trained on
        # every input (data, model, checkpoint) is checked by now: only from here on is the output
        # directory written, so a failed start never damages an earlier run
        if accelerator.is_main_process:
            prepare_output_dir(cfg, resume_path)
            if resume_path is not None:
                truncate_metrics(Path(cfg.output_dir) / "metrics.jsonl", state.global_step)
            elif cfg.resume_from_checkpoint == "latest":
                accelerator.print(f"no checkpoint in {checkpoint.checkpoints_dir(cfg.output_dir)} yet: "
                                  "starting fresh")
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        accelerator.wait_for_everyone()
        run_config = {**cfg.to_dict(), "world_size": world, "distributed_type": str(accelerator.distributed_type),
                      "n_params": self.n_params, "n_trainable_params": self.n_trainable,
                      "steps_per_epoch": self.steps_per_epoch,
                      "total_steps": self.total_steps,
                      # seconds per start-up part: where a slow start goes (reading, labels, tokenizing, model)
                      "startup_seconds": {k: round(v, 3) for k, v in timings.items()}}
        self.tracker = Tracker(accelerator, cfg, state, run_config)
        self.peak_flops = device_peak_flops(cfg)
        self.eval_hook = hook_factory(cfg) if hook_factory is not None and accelerator.is_main_process else None

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
    def train(self) -> str | None:
        """The training loop. Returns why it stopped early ("signal", "pruned", "early stopping") or None."""
        import torch
        from tqdm.auto import tqdm

        from fine_tune.core.model import describe_parameters, example_losses

        cfg, accelerator, model, state = self.cfg, self.accelerator, self.model, self.state
        accelerator.print(
            f"training {cfg.model_name_or_path} ({describe_parameters(self.n_trainable, self.n_params)}) on "
            f"{len(self.train_ds)} examples: {self.total_steps} optimizer steps of {self.sampler.global_batch} examples "
            f"({self.world} process(es) x {cfg.per_device_train_batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation), {accelerator.distributed_type}, "
            f"mixed precision {cfg.mixed_precision}")
        model.train()
        device = accelerator.device
        # see the module docstring: backward divides by the accumulation steps and the all-reduce
        # averages over ranks; this undoes both so the step's gradient is that of its mean loss
        loss_scale = self.world * accelerator.gradient_accumulation_steps
        self.window_loss = torch.zeros((), device=device)  # summed on the device, read only when logging
        self.window = {"units": 0, "examples": 0, "tokens": 0, "time": time.perf_counter()}
        progress = tqdm(total=self.total_steps, initial=state.global_step, desc="training", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process or cfg.disable_tqdm)
        stop_reason = None
        if state.pending_eval:  # a stop signal interrupted this step's evaluation: it comes first
            state.pending_eval = False
            if not self.evaluate_unless_stopped():
                self.save_checkpoint()
                return "signal"
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                stop_reason = "early stopping"
        while state.global_step < self.total_steps and stop_reason is None:
            for step in self.train_loader.iterate(state.epoch, state.step_in_epoch):
                micro_batches = step.micro_batches
                for j, batch in enumerate(micro_batches):
                    last = j == len(micro_batches) - 1
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    weight, target = batch.pop("weight"), batch.pop("labels")
                    # gradients are all-reduced only on the last micro-batch of the step
                    accelerator.sync_gradients = last
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        logits = model(**batch).logits
                        local = example_losses(logits, target, weight, cfg.task, self.class_weights,
                                               cfg.label_smoothing_factor).sum()
                        accelerator.backward(local * (loss_scale / step.units))
                    self.window_loss += local.detach()
                stop_votes = self.optimizer_step()
                if self.pruned:
                    stop_reason = "pruned"
                    break
                state.global_step += 1
                state.step_in_epoch += 1
                self.window["units"] += step.units
                self.window["examples"] += step.examples
                self.window["tokens"] += step.tokens
                progress.update(1)

                if state.global_step % cfg.logging_steps == 0 or state.global_step == self.total_steps:
                    self.log(progress)
                end_of_epoch = state.step_in_epoch >= self.steps_per_epoch
                new_best = False
                if "validation" in self.eval_loaders and (
                        (cfg.eval_strategy == "steps" and state.global_step % cfg.eval_steps == 0)
                        or (cfg.eval_strategy == "epoch" and end_of_epoch)):
                    result = self.evaluate_unless_stopped()
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
                        stop_reason = "early stopping"
                if end_of_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if stop_votes > 0:
                    stop_reason = "signal"
                if (cfg.save_strategy == "steps" and state.global_step % cfg.save_steps == 0) or \
                        (cfg.save_strategy == "epoch" and end_of_epoch) or stop_reason == "signal" or \
                        (new_best and cfg.load_best):  # the best weights are always on disk to load at the end
                    self.save_checkpoint()
                if state.global_step >= self.total_steps or stop_reason:
                    break
        progress.close()
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
                 **peak_memory_mb()}
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
    def evaluate(self) -> dict:
        """Evaluate on the validation split; track the best metric; step a plateau scheduler."""
        from fine_tune.core.optim import is_plateau

        cfg, state = self.cfg, self.state
        result = evaluate(self.model, self.eval_loaders["validation"], self.accelerator, cfg, self.labels,
                          self.extra_metrics, self.stop)
        result = {f"eval_{k}": v for k, v in result.items()}
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

    def evaluate_unless_stopped(self) -> dict | None:
        """Evaluate; None if a stop signal interrupted it (it then runs first on resume)."""
        try:
            return self.evaluate()
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

    def finish(self) -> dict:
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
                self.evaluate()
            elif model_step not in self.evals:  # the best evaluation came before a resume: evaluate it again
                self.evals[model_step] = {f"eval_{k}": v for k, v in evaluate(
                    self.model, self.eval_loaders["validation"], accelerator, cfg, self.labels,
                    self.extra_metrics).items()}
            results.update(self.evals[model_step])
        if "test" in self.eval_loaders:
            test = {f"test_{k}": v for k, v in evaluate(self.model, self.eval_loaders["test"], accelerator, cfg,
                                                       self.labels, self.extra_metrics, self.stop).items()}
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

    def finish_pruned(self) -> dict:
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


def run(cfg: TrainConfig) -> dict:
    """Set up, train, evaluate, save. Returns the final metrics (``"status": "pruned"`` and no final
    model when the eval hook stopped the run); exits with ``EXIT_CHECKPOINTED`` after a stop signal
    (a checkpoint was saved: requeue and resume)."""
    training = TrainingRun(cfg)
    try:
        training.setup()
        stop_reason = training.train()
        results = None
        if stop_reason == "pruned":
            results = training.finish_pruned()
        elif stop_reason != "signal":
            try:
                results = training.finish()
            except EvaluationInterrupted:  # the final evaluations: checkpoint, and they run on resume
                training.accelerator.print("final evaluation interrupted by the stop request")
                training.save_checkpoint()
                stop_reason = "signal"
    except BaseException:
        if training.lock is not None:  # a run that failed has ended: the folder is free
            training.lock.release()
        raise
    lock = training.lock
    if stop_reason == "signal":
        from fine_tune.core.checkpoint import latest_checkpoint

        training.accelerator.print(
            f"stopped by a signal at step {training.state.global_step}: checkpoint saved in "
            f"{latest_checkpoint(cfg.output_dir)}; rerun with --resume_from_checkpoint latest "
            f"(exit status {EXIT_CHECKPOINTED})")
    accelerator = training.accelerator
    # cleanup: the model, optimizer and loaders go with the run object, before the process group
    # (gloo processes otherwise abort at exit now and then: 'terminate called without an active
    # exception')
    del training
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()  # closes the trackers (main process) and the process group
    if lock is not None:
        lock.release()
    if stop_reason == "signal":
        sys.exit(EXIT_CHECKPOINTED)
    return results
