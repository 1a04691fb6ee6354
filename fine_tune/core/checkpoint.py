"""Checkpoints: atomic save, rotation, ``latest``, and a checked resume.

Layout::

    OUTPUT_DIR/checkpoints/step_<N>/   accelerate state (model, optimizer, scaler, every
                                       process's RNG), the scheduler and our TrainState
                                       (custom_checkpoint_*.pkl), train_state.json, config.yaml
    OUTPUT_DIR/checkpoints/latest      text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_<N>``, fsynced, and renamed; ``latest`` is replaced
atomically after the rename. A crash at any point leaves the previous checkpoint as
``latest``, and a half-written folder never has the name resume looks for.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from fine_tune.core.config import MATHS_FIELDS, TrainConfig, save_config
from fine_tune.core.errors import UserError, first_line

STATE_FILE = "train_state.json"
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

    # accelerate's register_for_checkpointing protocol
    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(accelerator, cfg: TrainConfig, state: TrainState) -> Path:
    """Save on every process (all must call it), atomically; returns the final folder."""
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_config(cfg, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if os.environ.get(CRASH_HOOK_ENV) == str(state.global_step):
            raise RuntimeError(f"{CRASH_HOOK_ENV} is set: simulated crash before renaming {tmp.name}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name + "\n")
        rotate(root, cfg.save_total_limit, keep_step=state.best_step)
    accelerator.wait_for_everyone()
    return final


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()]
    return sorted(found, key=_step_of)


def rotate(root: Path, limit: Optional[int], keep_step: Optional[int]) -> None:
    """Keep the newest ``limit`` checkpoints, and the best one in any case."""
    if not limit:
        return
    ckpts = list_checkpoints(root)
    for p in ckpts[:-limit]:
        if keep_step is None or _step_of(p) != keep_step:
            shutil.rmtree(p, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


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


def read_state(path: Path) -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({STATE_FILE}: {e}); resume from an older one "
                        "in the same folder") from None


def check_compatible(path: Path, cfg: TrainConfig, world_size: int) -> None:
    """Refuse a checkpoint whose maths-changing options differ from this run's."""
    import yaml

    if cfg.ignore_config_mismatch:
        return
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"checkpoint {path} is corrupt (config.yaml: {e})") from None
    current = cfg.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in MATHS_FIELDS if k in saved and saved.get(k) != current.get(k)]
    from fine_tune.core.data import data_fingerprint

    saved_state = read_state(path)
    if saved_state.world_size != world_size:
        diffs.append(f"world size: checkpoint {saved_state.world_size}, now {world_size}")
    if saved_state.data_fingerprint and saved_state.data_fingerprint != data_fingerprint(cfg):
        diffs.append("the content of the training or validation data differs (its fingerprint)")
    if diffs:
        raise UserError(f"checkpoint {path} was made with different settings ({'; '.join(diffs)}); "
                        "resuming would change the maths. Use the same settings, or pass "
                        "--ignore_config_mismatch to resume anyway")


def load_checkpoint(accelerator, path: Path) -> None:
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or incomplete ({first_line(e)}); resume from an older "
                        "checkpoint in the same folder") from None
