"""Metric logging: ``metrics.jsonl`` always, TensorBoard and W&B through accelerate's trackers.

``metrics.jsonl`` keeps the flat names other tools read (``loss``, ``learning_rate``,
``eval_accuracy`` ...). The trackers get grouped names (``train/loss``, ``eval/accuracy``),
all against the optimizer step. Only the main process writes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def tracker_name(key: str) -> str:
    """Flat metrics.jsonl key -> grouped tracker tag."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith("test_"):
        return "test/" + key[len("test_"):]
    return "train/" + key


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop events logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is suspect
    path.write_text("".join(k + "\n" for k in kept))


class Tracker:
    def __init__(self, accelerator, cfg, state, run_config: dict):
        self.accelerator = accelerator
        self.cfg = cfg
        self.main = accelerator.is_main_process
        self.path = Path(cfg.output_dir) / METRICS_FILE
        self.active = []
        if not self.main:
            return
        names = cfg.trackers
        if not names:
            return
        init_kwargs = {}
        if "wandb" in names:
            run_id = state.tracker_ids.get("wandb")
            if run_id is None:
                import wandb

                run_id = os.environ.get("WANDB_RUN_ID") or wandb.util.generate_id()
                state.tracker_ids["wandb"] = run_id
            init_kwargs["wandb"] = {
                "id": run_id, "resume": "allow", "name": cfg.run_name, "group": cfg.wandb_group,
                "tags": [t.strip() for t in (cfg.wandb_tags or "").split(",") if t.strip()] or None,
                "dir": str(Path(cfg.output_dir)),
            }
        try:
            accelerator.init_trackers(cfg.wandb_project if "wandb" in names else "tensorboard",
                                      config=run_config, init_kwargs=init_kwargs)
            self.active = names
        except Exception as e:  # noqa: BLE001 - never let a tracker stop training
            warnings.warn(f"tracking disabled ({', '.join(names)}): {e}")

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.active:
            try:
                self.accelerator.log({tracker_name(k): v for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and k != "epoch"} | {"train/epoch": metrics.get("epoch", 0)},
                                     step=step)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"tracker logging failed, going on without it: {e}")
                self.active = []

    def finish(self) -> None:
        if self.main and self.active:
            try:
                self.accelerator.end_training()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"closing the trackers failed: {e}")
