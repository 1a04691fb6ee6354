"""Checkpoints: atomic save, rotation, ``latest``, a manifest, and a checked resume that runs no code.

Layout::

    OUTPUT_DIR/checkpoints/step_<N>/   accelerate state (model safetensors, optimizer, scaler, every
                                       process's RNG: tensors only, loaded with weights_only=True),
                                       train_state.json (our TrainState), scheduler.json (the
                                       scheduler's state), config.yaml, labels.json (the
                                       label names, for `fine-tune export`), manifest.json
    OUTPUT_DIR/checkpoints/latest      text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_<N>``, listed in ``manifest.json`` (every file's
size and sha256, each process hashing its share of the files), fsynced, and renamed;
``latest`` is replaced atomically after the rename.
A crash at any point leaves the previous checkpoint as ``latest``, and a half-written folder
never has the name resume looks for. On resume the manifest is checked first: a damaged or
foreign file is reported as corruption before anything is loaded, so a load error that
follows (out of memory, another library version) is reported as what it is.

Nothing in a checkpoint can run code: the loop state and the scheduler are JSON (accelerate's
``register_for_checkpointing`` would pickle them), and every torch file is loaded with
``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` while loading, which covers
DeepSpeed's own loader too).

With frozen weights (LoRA) a checkpoint holds only the trainable ones and their optimizer
state: the frozen ones are the pre-trained model's, loaded again at resume.

A checkpoint resumes on another number of processes with the same global batch
(:mod:`fine_tune.core.elastic`: the split, and DeepSpeed's resharding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from fine_tune.core.config import MATHS_FIELDS, TrainConfig, save_config
from fine_tune.core.errors import UserError, first_line
from fine_tune.core.outputs import check_output_dir, fsync_dir, fsync_tree, on_main, write_atomic

STATE_FILE = "train_state.json"
SCHEDULER_FILE = "scheduler.json"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"  # the label names, for `fine-tune export`
CRASH_HOOK_ENV = "FINE_TUNE_TEST_CRASH_BEFORE_RENAME"  # tests: =N fails saving step N before the rename


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped."""
    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # fp16 overflow steps skipped by the scaler
    world_size: int = 1
    tracker_ids: dict = field(default_factory=dict)  # e.g. {"wandb": run id}
    data_fingerprint: Optional[str] = None  # data.data_fingerprint: resuming on other data is refused
    pending_eval: bool = False  # a stop signal interrupted this step's evaluation: redo it on resume

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


# ------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _threads(n_files: int, local_processes: int = 1) -> int:
    """Hashing threads for one process: its share of the node's cores (hashlib releases the
    GIL on large buffers, so files hash in parallel)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_files, cores // max(local_processes, 1)))


def _hash_files(folder: Path, names: list[str], threads: int) -> dict:
    """name -> {"size", "sha256"}, the files hashed in parallel by ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> tuple[str, dict]:
        path = folder / name
        return name, {"size": path.stat().st_size, "sha256": _sha256(path)}

    if threads <= 1 or len(names) <= 1:
        return dict(map(one, names))
    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, names))


def _shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """The files split over ``n`` processes by size (largest first, to the least loaded)."""
    loads, shares = [0] * n, [[] for _ in range(n)]
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += sizes[name]
    return shares


def write_manifest(folder: Path, accelerator=None) -> None:
    """List every file of ``folder`` with its size and sha256 in ``manifest.json``. With an
    accelerator, every process must call it: the main process lists the files, each process
    hashes its share (by size) with its share of the node's cores, and the main process writes
    the manifest. The hashing is the save's largest cost after the writing itself."""
    world = 1 if accelerator is None else accelerator.num_processes
    if world == 1:
        names = [p.relative_to(folder).as_posix() for p in _files(folder)]
        files = _hash_files(folder, names, _threads(len(names)))
    else:
        from accelerate.utils import broadcast_object_list, gather_object

        box = [{p.relative_to(folder).as_posix(): p.stat().st_size for p in _files(folder)}
               if accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)  # one listing: every rank hashes from the same
        share = _shares(box[0], world)[accelerator.process_index]
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mine = _hash_files(folder, share, _threads(len(share), local))
        files = {}
        for part in gather_object([mine]):
            files.update(part)
        if not accelerator.is_main_process:
            return
    files = dict(sorted(files.items()))
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(path: Path) -> None:
    """Every file of the checkpoint is the one that was saved, and there is no other."""
    def corrupt(what: str) -> UserError:
        return UserError(f"checkpoint {path} is corrupt ({what}); resume from an older checkpoint in the same folder")

    try:
        listed = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        raise corrupt(f"no {MANIFEST_FILE}: incomplete, or written by an older version of fine_tune") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise corrupt(f"{MANIFEST_FILE} unreadable: {e}") from None
    present = {p.relative_to(path).as_posix(): p for p in _files(path)}
    for name, meta in listed.items():
        if name not in present:
            raise corrupt(f"{name} is missing")
        size = present[name].stat().st_size
        if size != meta["size"]:
            raise corrupt(f"{name} has {size} bytes, {meta['size']} were saved")
    hashed = _hash_files(path, sorted(listed), _threads(len(listed)))
    for name, meta in listed.items():
        if hashed[name]["sha256"] != meta["sha256"]:
            raise corrupt(f"{name} differs from what was saved (sha256)")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise corrupt(f"{extra[0]} was not written by fine_tune")


# ------------------------------------------------------------------ save
def save_checkpoint(accelerator, cfg: TrainConfig, state: TrainState, scheduler) -> Path:
    """Save on every process (all must call it), atomically; returns the final folder."""
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # DeepSpeed writes its own files: it leaves frozen weights out when asked (a no-op without any)
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}))
    if accelerator.is_main_process:
        save_config(cfg, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2))
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), indent=1))
        (tmp / LABELS_FILE).write_text(json.dumps({"names": _label_names(accelerator, cfg)}))
    accelerator.wait_for_everyone()
    write_manifest(tmp, accelerator)  # every process hashes its share
    if accelerator.is_main_process:
        fsync_tree(tmp)
        if os.environ.get(CRASH_HOOK_ENV) == str(state.global_step):
            raise RuntimeError(f"{CRASH_HOOK_ENV} is set: simulated crash before renaming {tmp.name}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_atomic(root / "latest", final.name + "\n")
        keep = {final.name} | ({f"step_{state.best_step}"} if state.best_step is not None else set())
        rotate(root, cfg.save_total_limit, keep)
        from fine_tune.core.elastic import remove_universal

        remove_universal(root)  # a conversion left by a crash while loading it
    accelerator.wait_for_everyone()
    return final


def _label_names(accelerator, cfg: TrainConfig) -> list[str]:
    """The model's label names in id order (none for a task without label names)."""
    from fine_tune.core.tasks import task_for

    if not task_for(cfg).has_label_names:
        return []
    model = accelerator.unwrap_model(accelerator._models[0])
    config = getattr(model, "get_base_model", lambda: model)().config
    return [config.id2label[i] for i in sorted(int(k) for k in config.id2label)] if config.id2label else []


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()]
    return sorted(found, key=_step_of)


def rotate(root: Path, limit: Optional[int], keep: set[str]) -> None:
    """Keep the newest ``limit`` checkpoints, and in any case those named in ``keep`` (the one
    just written, the best one) and the one ``latest`` names."""
    if limit:
        pointer = root / "latest"
        protected = set(keep) | ({pointer.read_text().strip()} if pointer.exists() else set())
        for p in list_checkpoints(root)[:-limit]:
            if p.name not in protected:
                shutil.rmtree(p, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def set_aside_newer(resume_path: Path) -> Optional[str]:
    """Resuming from an older checkpoint abandons the newer ones of the same folder: move them
    into ``checkpoints/abandoned-<time>/`` (so ``latest``, rotation and a later resume see one
    story) and point ``latest`` at the resumed one. Returns a line saying what moved, if any."""
    root = resume_path.parent
    newer = [p for p in list_checkpoints(root) if _step_of(p) > _step_of(resume_path)]
    if newer:
        aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for p in newer:
            os.rename(p, aside / p.name)
    write_atomic(root / "latest", resume_path.name + "\n")
    if not newer:
        return None
    return (f"resuming from {resume_path.name}: the newer checkpoints {', '.join(p.name for p in newer)} "
            f"belong to the abandoned continuation and were moved to {aside}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    root = checkpoints_dir(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    ckpts = list_checkpoints(root)  # pointer missing or stale: newest complete one
    return ckpts[-1] if ckpts else None


def resolve_resume(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint to resume from, or None to start fresh."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        return latest_checkpoint(cfg.output_dir)
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {path}: no such folder; give a checkpoint folder "
                        "(OUTPUT_DIR/checkpoints/step_N) or 'latest'")
    if not (path / STATE_FILE).exists():
        raise UserError(f"--resume_from_checkpoint {path} is not a checkpoint (no {STATE_FILE}); "
                        "checkpoints are OUTPUT_DIR/checkpoints/step_N")
    return path


def choose_resume(accelerator, cfg: TrainConfig) -> Optional[Path]:
    """Rank 0 picks the checkpoint to resume (or none), verifies its manifest and settings and
    checks the output folder; every rank resumes from that choice, whatever it would read itself."""
    def pick() -> Optional[tuple]:
        path = resolve_resume(cfg)
        fitted = None
        if path is not None:
            verify_manifest(path)
            fitted = check_compatible(path, cfg, accelerator.num_processes)
        check_output_dir(cfg, path)
        return None if path is None else (str(path), fitted)

    chosen = on_main(accelerator, pick)
    if chosen is None:
        return None
    path, fitted = Path(chosen[0]), chosen[1]
    if fitted is not None:  # another world size: the same global batch, split for this one
        from fine_tune.core import elastic

        accelerator.print(elastic.describe_fit(tuple(fitted["saved"]), tuple(fitted["now"]),
                                               accelerator.num_processes))
        cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps = fitted["now"]
    return path


def read_state(path: Path) -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({STATE_FILE}: {e}); resume from an older one "
                        "in the same folder") from None


def check_compatible(path: Path, cfg: TrainConfig, world_size: int) -> Optional[dict]:
    """Refuse a checkpoint whose maths-changing options differ from this run's. On another world
    size the global batch must be the same (:func:`fine_tune.core.elastic.fit_global_batch`);
    returns the per-device batch and accumulation that keep it (``{"saved": (batch,
    accumulation, world), "now": (batch, accumulation)}``) when they differ from the options."""
    import yaml

    from fine_tune.core import elastic

    if cfg.ignore_config_mismatch:
        return None
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"checkpoint {path} is corrupt (config.yaml: {e})") from None
    current = cfg.to_dict()
    saved_state = read_state(path)
    fitted = None
    split = ("per_device_train_batch_size", "gradient_accumulation_steps")
    if saved_state.world_size != world_size and all(k in saved for k in split):
        asked = (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
        before = (int(saved[split[0]]), int(saved[split[1]]), int(saved_state.world_size))
        now = elastic.fit_global_batch(before, asked, world_size)
        fitted = {"saved": before, "now": now}
        current.update(zip(split, (saved[split[0]], saved[split[1]])))  # compared through the global batch
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in MATHS_FIELDS if k in saved and saved.get(k) != current.get(k)]
    from fine_tune.core.data import data_fingerprint

    if saved_state.data_fingerprint and saved_state.data_fingerprint != data_fingerprint(cfg):
        diffs.append("the content of the training or validation data differs (its fingerprint)")
    if diffs:
        raise UserError(f"checkpoint {path} was made with different settings ({'; '.join(diffs)}); "
                        "resuming would change the maths. Use the same settings, or pass "
                        "--ignore_config_mismatch to resume anyway")
    return fitted


def _is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def save_trainable_weights_only(accelerator) -> None:
    """Make accelerate's checkpoints of a partly frozen model hold its trainable weights only
    (DeepSpeed: see save_checkpoint); a full fine-tune is saved as before."""
    from safetensors.torch import load_file

    def trainable(model) -> set:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def is_partly_frozen(model) -> bool:
        return any(not p.requires_grad for p in model.parameters())

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            if is_partly_frozen(model):
                keep = trainable(model)
                for key in [k for k in state if k not in keep]:
                    del state[key]

    def load_trainable(models, input_dir):
        for i, model in enumerate(list(models)):
            if not is_partly_frozen(model):
                continue
            file = Path(input_dir) / f"model{'' if i == 0 else f'_{i}'}.safetensors"
            missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
            absent = trainable(model) & set(missing)
            if unexpected or absent:
                raise RuntimeError(f"{file.name} does not fit the model's trainable weights "
                                   f"({len(absent)} missing, {len(unexpected)} unexpected)")
            models.remove(model)  # loaded: accelerate must not load it again, strictly

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def _deepspeed_safe_globals() -> list:
    """The plain data classes DeepSpeed pickles into its optimizer state (the loss scaler, the
    ZeRO stage enum, parameter fragment addresses): rebuilding them sets attributes and runs
    nothing else."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_loads(accelerator):
    return weights_only_loads(_is_deepspeed(accelerator))


@contextlib.contextmanager
def weights_only_loads(deepspeed: bool):
    """Every ``torch.load`` inside (accelerate's, DeepSpeed's) uses weights_only=True, even
    where the caller asked for weights_only=False."""
    import torch

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allowed = _deepspeed_safe_globals() if deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_checkpoint(accelerator, path: Path, state: TrainState, scheduler=None) -> None:
    """Load a checkpoint whose manifest was verified (:func:`verify_manifest`): a failure here
    is not damage (out of memory, another library version, another model), and is not called so."""
    import torch

    from fine_tune.core import elastic
    from fine_tune.core.outputs import on_main

    def convert() -> str:
        with _weights_only_loads(accelerator):
            return str(elastic.convert_to_universal(path))

    try:
        source, resharding = path, contextlib.nullcontext()
        if _is_deepspeed(accelerator) and elastic.saved_world_size(path) != accelerator.num_processes:
            # ZeRO partitions by rank: another world size loads DeepSpeed's universal form of it
            source, resharding = Path(on_main(accelerator, convert)), elastic.universal_loading(accelerator)
        with _weights_only_loads(accelerator), resharding:
            # DeepSpeed: a checkpoint without the frozen weights (LoRA) loads over the pre-trained ones
            accelerator.load_state(str(source),
                                   **({"load_module_strict": False} if _is_deepspeed(accelerator) else {}))
        if source != path:  # the conversion served its one load (every rank is done with it)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(source, ignore_errors=True)
        state.load_state_dict(json.loads((path / STATE_FILE).read_text()))
        state.world_size = accelerator.num_processes  # the next checkpoint is this world's
        if scheduler is not None:
            scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - reported in one line: the files are intact
        raise UserError(f"checkpoint {path} is intact (it matches its manifest) but could not be loaded: "
                        f"{first_line(e)}. "
                        "Was it made by another model, or with other library versions?") from None
