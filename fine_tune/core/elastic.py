"""Resuming on another number of processes: the same global batch, and state resharded.

A requeued job may land on another allocation (8 GPUs become 4). The maths of a run is its
global batch (per-device batch x accumulation x processes) and its example order; the
sampler's order depends only on the seed, the epoch and the global batch, not on the number
of processes, so a run can continue the same sequence of global batches on 1, 2 or 4
processes once the per-device batch and the accumulation are chosen to keep the product.

What must be resharded:

- plain / DDP: nothing; every process saved (and loads) the full model and optimizer state.
  RNG states: each process loads its own if the checkpoint has one (a process that had none
  starts from the seed; with dropout on, its masks differ from the uninterrupted run's).
- DeepSpeed ZeRO-1/2/3: the optimizer state (and ZeRO-3's weights) is partitioned by rank.
  DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) turns the
  partitions into one folder per parameter (fp32 weights, Adam moments), which any number of
  ranks loads (``load_universal``). The conversion is written next to the checkpoint, in
  ``checkpoints/.universal-step_N/`` (it never alters a checkpoint, whose manifest stays
  true), once, by the main process; it is removed once loaded (one left by a crash while
  loading goes with the run's next save).
- FSDP: accelerate saves through torch distributed checkpoint (``SHARDED_STATE_DICT``) or
  one full state (``FULL_STATE_DICT``); both are resharded on load by torch, so nothing is
  converted.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from fine_tune.core.errors import UserError

UNIVERSAL_PREFIX = ".universal-"


# ------------------------------------------------------------------ the global batch
def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def fit_global_batch(saved: tuple[int, int, int], asked: tuple[int, int], world: int) -> tuple[int, int]:
    """The per-device batch and accumulation that keep the checkpoint's global batch on ``world``
    processes. ``saved`` is the checkpoint's (per-device batch, accumulation, processes), ``asked``
    this run's options. Asked values that keep the global batch are used as they are; the
    checkpoint's own values (the same command requeued) keep the per-device batch (and so the
    memory per device) and change the accumulation. Anything else is refused in one line that
    names a split which keeps the global batch."""
    batch, accumulation, saved_world = saved
    global_batch = batch * accumulation * saved_world
    if asked[0] * asked[1] * world == global_batch:
        return asked
    was = f"{batch} x {accumulation} accumulation x {saved_world} process(es)"
    if global_batch % world:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise UserError(f"the checkpoint's global batch of {global_batch} ({was}) cannot be split over {world} "
                        f"processes; resume on {', '.join(map(str, fits))} processes, or pass "
                        "--ignore_config_mismatch to change the global batch")
    share = global_batch // world
    if asked == (batch, accumulation) and share % batch == 0:
        return batch, share // batch
    fit = _largest_divisor_at_most(share, asked[0])
    raise UserError(f"the checkpoint's global batch of {global_batch} ({was}) is not kept by "
                    f"--per_device_train_batch_size {asked[0]} --gradient_accumulation_steps {asked[1]} on {world} "
                    f"process(es); use --per_device_train_batch_size {fit} --gradient_accumulation_steps "
                    f"{share // fit}, or pass --ignore_config_mismatch to change the global batch")


def describe_fit(saved: tuple[int, int, int], fitted: tuple[int, int], world: int) -> str:
    batch, accumulation, saved_world = saved
    return (f"resuming a checkpoint of {saved_world} process(es) on {world}: per-device batch {fitted[0]} x "
            f"accumulation {fitted[1]} x {world} keeps the global batch of {batch * accumulation * saved_world} "
            f"(was {batch} x {accumulation} x {saved_world})")


# ------------------------------------------------------------------ DeepSpeed
def universal_dir(path: Path) -> Path:
    return path.parent / f"{UNIVERSAL_PREFIX}{path.name}"


def convert_to_universal(path: Path, engine_dir: str = "pytorch_model") -> Path:
    """DeepSpeed's universal form of the checkpoint's engine state (main process only; the files
    were checked against the manifest). Returns a folder laid out as the checkpoint, whose
    ``pytorch_model/`` is universal and whose other files link to the checkpoint's."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    staged = universal_dir(path)
    done = staged / ".complete"
    if done.exists():
        return staged
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for item in path.iterdir():
        if item.name != engine_dir:
            (staged / item.name).symlink_to(item.resolve())
    args = Namespace(input_folder=str(path / engine_dir), output_folder=str(staged / engine_dir),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)  # a plain model has no model-parallel layout to record
    with _quiet():
        ds_to_universal.main(args)
    # the engine's own model file (its step count, the module for ZeRO-1/2) sits beside zero/
    for f in (path / engine_dir).glob("mp_rank_*_model_states.pt"):
        target = staged / engine_dir / f.name
        if not target.exists():
            shutil.copyfile(f, target)
    done.write_text("")
    return staged


class _quiet:
    """ds_to_universal prints its progress: keep it off the run's log (an error is raised as usual)."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._redirect.enter_context(contextlib.redirect_stderr(io.StringIO()))  # its progress bars

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


def engines(accelerator) -> list:
    return [m for m in accelerator._models if hasattr(m, "load_universal_checkpoint")]


class universal_loading:
    """Inside, every DeepSpeed engine of ``accelerator`` loads checkpoints in universal form.

    ZeRO-3's universal load gives every parameter group the hyper-parameters of the first
    (``param_group[key] = value`` for each group): the biases and LayerNorm weights would get
    weight decay. Each group's own weight decay (an option, the same in the checkpoint) is put
    back after the load. It also gives every group the same step-counter tensor, which torch's
    AdamW increments in place: each optimizer step would count once per group (wrong bias
    correction for all groups but the first); each group gets its own copy."""

    def __init__(self, accelerator):
        self.engines = engines(accelerator)

    def __enter__(self):
        self.previous = [e._config.load_universal_checkpoint for e in self.engines]
        self.decay = [[g.get("weight_decay") for g in e.optimizer.param_groups] for e in self.engines]
        for e in self.engines:
            e._config.load_universal_checkpoint = True

    def __exit__(self, *exc):
        for e, value, decay in zip(self.engines, self.previous, self.decay):
            e._config.load_universal_checkpoint = value
            for group, wd in zip(e.optimizer.param_groups, decay):
                group["weight_decay"] = wd
            for state in e.optimizer.state.values():  # one step counter each (see the docstring)
                if hasattr(state.get("step"), "clone"):
                    state["step"] = state["step"].clone()


def remove_universal(root: Path, keep: Optional[str] = None) -> None:
    """Conversions are for loading once: drop them (but ``keep``) when a new checkpoint is saved."""
    for staged in root.glob(f"{UNIVERSAL_PREFIX}*"):
        if staged.name != keep:
            shutil.rmtree(staged, ignore_errors=True)


def saved_world_size(path: Path) -> Optional[int]:
    import json

    try:
        return int(json.loads((path / "train_state.json").read_text()).get("world_size", 1))
    except (OSError, ValueError, TypeError):
        return None
