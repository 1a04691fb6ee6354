"""Metric logging: ``metrics.jsonl`` always, TensorBoard and W&B through accelerate's trackers.

``metrics.jsonl`` keeps the flat names other tools read (``loss``, ``learning_rate``,
``eval_accuracy`` ...) plus ``elapsed_s``, the run's wall time so far (resumed runs
continue the count). The trackers get grouped names (``train/loss``, ``eval/accuracy``,
``test/accuracy``), all against the optimizer step. Only the main process writes.

* TensorBoard: event files in ``OUTPUT_DIR/tensorboard/`` (``tensorboard --logdir
  OUTPUT_DIR/tensorboard``), the resolved config as hyperparameters. A resumed run purges
  the events logged after its checkpoint, so every step appears once.
* W&B: ``OUTPUT_DIR/wandb/``; the run config holds every option plus the git commit,
  world size, distributed type, mixed precision and package versions. The run id lives in
  the checkpoint (``TrainState.tracker_ids``), so a resumed or requeued job continues the
  same run. W&B never stops training: without network it logs offline (upload later with
  ``wandb sync OUTPUT_DIR/wandb/offline-run-*``), and any W&B failure is reported once,
  after which training goes on without it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from fine_tune.core.errors import first_line
from fine_tune.core.outputs import write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
DEFAULT_WANDB_URL = "https://api.wandb.ai"
REACH_TIMEOUT_S = 3.0
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "evaluate",
                      "deepspeed", "wandb", "tensorboard", "numpy")


def tracker_name(key: str) -> str:
    """Flat metrics.jsonl key -> grouped tracker tag."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith("test_"):
        return "test/" + key[len("test_"):]
    return "train/" + key


def flat_name(tag: str) -> str:
    """Grouped tracker tag -> flat metrics.jsonl key (the inverse of :func:`tracker_name`)."""
    group, _, name = tag.partition("/")
    if not name:
        return tag
    return {"eval": f"eval_{name}", "test": f"test_{name}"}.get(group, name)


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop events logged after the checkpoint (they will be logged again).

    The kept lines go to a new file renamed over the old one: a kill or a full disk during
    the rewrite leaves the old file whole, never a cut one."""
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
    write_atomic(path, "".join(k + "\n" for k in kept))


def _last_elapsed(path: Path) -> float:
    """Wall time recorded by the previous segments of a resumed run."""
    if not path.exists():
        return 0.0
    elapsed = 0.0
    for line in path.read_text().splitlines():
        try:
            elapsed = max(elapsed, float(json.loads(line).get("elapsed_s", 0.0)))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue
    return elapsed


def _process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or restricted: count from now
        return time.time()


# ------------------------------------------------------------------ run metadata
def git_info(root: Optional[Path] = None) -> dict:
    """Commit of the code that runs (and whether it has uncommitted changes), if in git."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def package_versions() -> dict:
    from importlib import metadata

    import fine_tune

    out = {"python": sys.version.split()[0], "fine_tune": fine_tune.__version__}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_metadata(accelerator, run_config: dict) -> dict:
    """The run config every tracker gets: resolved options + where and with what it ran."""
    meta = dict(run_config)
    dist = meta.get("distributed_type", getattr(accelerator, "distributed_type", ""))
    meta["distributed_type"] = str(getattr(dist, "value", dist)).replace("DistributedType.", "")
    meta.setdefault("world_size", getattr(accelerator, "num_processes", 1))
    meta["mixed_precision"] = str(getattr(accelerator, "mixed_precision", meta.get("mixed_precision", "no")))
    meta.update(git_info())
    meta["versions"] = package_versions()
    return meta


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dict -> {'a/b': scalar}; None and lists become text (TensorBoard hparams)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = "None" if value is None else json.dumps(value, default=str)
    return out


# ------------------------------------------------------------------ W&B helpers
def new_run_id(length: int = 8) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL)


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, Optional[str]]:
    """W&B mode to start in, and why it is not the requested one (None when it is)."""
    requested = os.environ.get("WANDB_MODE", "online").strip().lower() or "online"
    if requested in ("offline", "dryrun", "disabled"):
        return ("offline" if requested == "dryrun" else requested), None
    if not reachable(wandb_url()):
        return "offline", f"{wandb_url()} is unreachable"
    return "online", None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _make_safe(inner, label: str):
    """Wrap an accelerate tracker so that a failing log or finish warns once and goes on."""
    from accelerate.tracking import GeneralTracker

    class SafeTracker(GeneralTracker):
        name = inner.name
        requires_logging_directory = inner.requires_logging_directory
        main_process_only = getattr(inner, "main_process_only", True)

        def __init__(self):
            super().__init__()
            self.inner = inner
            self.broken = False

        @property
        def tracker(self):
            return self.inner.tracker

        def start(self):
            self.inner.start()

        def store_init_configuration(self, values: dict):
            self.inner.store_init_configuration(values)

        def log(self, values: dict, step: Optional[int] = None, **kwargs):
            if self.broken:
                return
            try:
                self.inner.log(values, step=step, **kwargs)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self.broken = True
                warn(f"{label} logging failed ({type(e).__name__}: {e}); training goes on without {label}")

        def finish(self):
            try:
                self.inner.finish()
            except Exception as e:  # noqa: BLE001
                warn(f"closing {label} failed ({type(e).__name__}: {e})")

    return SafeTracker()


# ------------------------------------------------------------------ the tracker
class Tracker:
    """Write every logging/eval event to metrics.jsonl and the requested trackers.

    Constructed once per process after the checkpoint is loaded (``state.tracker_ids``
    then holds the W&B run id of a resumed run). The trackers are appended to
    ``accelerator.trackers``, so ``accelerator.end_training()`` closes them.

    Not ``accelerator.init_trackers``: it raises when a tracker fails to start, and it cannot
    fall back from W&B online to offline; tracking must never stop training. accelerate's
    own tracker classes do the work, wrapped so that a failing call warns and goes on.
    """

    def __init__(self, accelerator, cfg, state, run_config: dict):
        self.accelerator = accelerator
        self.cfg = cfg
        self.main = accelerator.is_main_process
        self.path = Path(cfg.output_dir) / METRICS_FILE
        self.active: list[str] = []
        self.trackers: list = []
        if not self.main:
            return
        self.start_time = _process_start_time()
        self.elapsed_before = _last_elapsed(self.path) if state.global_step > 0 else 0.0
        names = cfg.trackers
        if not names:
            return
        self.run_config = run_metadata(accelerator, run_config)
        if "tensorboard" in names:
            self._start("TensorBoard", lambda: self._tensorboard(state))
        if "wandb" in names:
            self._start("W&B", lambda: self._wandb(state))
        accelerator.trackers.extend(self.trackers)

    # ---------------------------------------------------------------- start-up
    def _start(self, label: str, start) -> None:
        try:
            tracker = start()
        except Exception as e:  # noqa: BLE001 - never let a tracker stop training
            warn(f"{label} disabled ({type(e).__name__}: {e}); metrics still go to {self.path}")
            return
        if tracker is not None:
            self.trackers.append(_make_safe(tracker, label))
            self.active.append(tracker.name)

    def _tensorboard(self, state):
        from accelerate.tracking import TensorBoardTracker

        logdir = Path(self.cfg.output_dir) / TENSORBOARD_DIR
        kwargs = {}
        if state.global_step > 0:  # resumed: hide events logged after the checkpoint
            kwargs["purge_step"] = state.global_step + 1
        tracker = TensorBoardTracker("", str(logdir), **kwargs)
        tracker.start()
        writer = tracker.writer
        hparams = flatten(self.run_config)
        try:
            # hyperparameters in the run itself (not a time-stamped sub-run), for the HPARAMS tab
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            exp, ssi, sei = hparams_summary(hparams, {})
            # (SummaryWriter.add_hparams would write them into a new time-stamped sub-run)
            for summary in (exp, ssi, sei):
                writer.file_writer.add_summary(summary)
        except Exception:  # noqa: BLE001 - the text copy below is enough
            pass
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
        writer.add_text("config", text, global_step=state.global_step)
        writer.flush()
        return tracker

    def _wandb(self, state):
        import wandb
        from accelerate.tracking import WandBTracker

        cfg = self.cfg
        run_id = state.tracker_ids.get("wandb")
        if run_id is None:
            run_id = os.environ.get("WANDB_RUN_ID") or new_run_id()
            state.tracker_ids["wandb"] = run_id
        root = Path(cfg.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        mode, reason = wandb_mode()
        if mode == "disabled":
            return None
        if reason:
            warn(f"W&B: {reason}; logging offline to {root / WANDB_DIR} "
                 f"(upload later with `wandb sync {root / WANDB_DIR}/offline-run-*`)")
        kwargs = {
            "id": run_id, "resume": "allow", "name": cfg.run_name, "group": cfg.wandb_group,
            "tags": [t.strip() for t in (cfg.wandb_tags or "").split(",") if t.strip()] or None,
            "dir": str(root), "config": self.run_config,
        }

        def start(mode: str):
            tracker = WandBTracker(cfg.wandb_project, **kwargs,
                                   settings=wandb.Settings(mode=mode, init_timeout=60))
            tracker.start()
            return tracker

        try:
            tracker = start(mode)
        except Exception as e:  # noqa: BLE001 - no credentials, server error, timeout ...
            if mode != "online":
                raise
            warn(f"W&B could not start online ({type(e).__name__}: {first_line(e)}); "
                 f"logging offline to {root / WANDB_DIR} instead (upload later with `wandb sync`)")
            tracker = start("offline")
        run = tracker.run
        try:  # summaries that make runs comparable in the W&B table
            best = tracker_name(cfg.best_metric)
            run.define_metric(best, summary="max" if cfg.best_is_greater else "min")
            run.define_metric("train/loss", summary="min")
        except Exception:  # noqa: BLE001 - cosmetic
            pass
        return tracker

    # ---------------------------------------------------------------- logging
    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.start_time)

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        record = {"step": step, **metrics, "elapsed_s": round(self.elapsed(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.trackers:
            return
        values = {tracker_name(k): v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if "epoch" in metrics and any(k.startswith("train/") for k in values):
            values["train/epoch"] = metrics["epoch"]  # once per step, with the training metrics
        for tracker in self.trackers:
            tracker.log(values, step=step)
