"""Run train.py on Slurm (or on this machine) through submitit: multi-node jobs, sweeps as job
arrays, preemption that checkpoints, requeues and resumes.

    python slurm/submit.py [options] -- [train.py flags]        (or: python -m fine_tune.slurm ...)

One submitit task per node. Each task reads its place in the job from
``submitit.JobEnvironment`` (the head node is the first host, the machine rank is the node
index) and starts its own ``accelerate launch`` with ``--resume_from_checkpoint latest`` and
``--expected_world_size`` added, so a requeued job continues where it stopped and a job that
sees fewer processes than it asked for fails at start-up. Nothing per node is expanded in a
batch shell, which is how every node ends up claiming rank 0 (accelerate #2816).

Preemption and time limits: Slurm sends USR2 (``--signal=USR2@signal_delay_s``) to every
process of the job step, training processes included; the launcher is started with USR2
ignored (``accelerate launch`` and torchrun would die of it, and do not forward it), the
task forwards it to the training processes again until they stop (one that is still
loading would miss it), every rank checkpoints at the same optimizer step and exits, and
the head task's :meth:`TrainJob.checkpoint` requeues the job (at most ``--max_requeues``
times, counted by ``SLURM_RESTART_COUNT``).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import submitit

from fine_tune import EXIT_CHECKPOINTED
from fine_tune.core.checkpoint import latest_checkpoint
from fine_tune.core.config import ConfigError, main_guard, parse_args
from fine_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "train.py"
DEFAULT_ACCELERATE_CONFIG = "accelerate_configs/multi_node_ddp.yaml"
PORT_BASE, PORT_SPAN = 15000, 10000  # main process port = 15000 + job id % 10000 (Lightning's rule)
PREFIX = "[fine_tune.launchers.slurm]"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "PREEMPTED", "SPECIAL_EXIT"}


class NotRequeued(RuntimeError):
    """Preempted or out of time once more than --max_requeues allows: the checkpoint is kept."""


class JobSetupError(RuntimeError):
    """The job does not have the shape that was asked for (nodes, GPUs)."""


class TrainingFailed(RuntimeError):
    pass


# ------------------------------------------------------------------ what every node runs
@dataclass
class JobSpec:
    """Everything a task needs to start its node's share of one training run (pickled with the job)."""
    train_args: list  # train.py flags, --output_dir (absolute) included
    output_dir: str
    accelerate_config: str  # absolute path
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU nodes, one training process each
    main_process_ip: Optional[str] = None  # default: the job's first host
    max_requeues: int = 10
    signal_delay_s: int = 180
    cluster: str = "slurm"
    name: str = ""  # sweep point name, "" for a single run
    run_id: str = ""  # W&B run id offered to train.py (a checkpoint's own id wins)
    deepspeed_config_file: Optional[str] = None  # absolute, when the accelerate config names one
    workdir: str = field(default_factory=os.getcwd)

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def _read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_deepspeed_config(path: str | os.PathLike) -> bool:
    return str(_read_yaml(path).get("distributed_type", "")).upper() == "DEEPSPEED"


def deepspeed_json(config: Path) -> Optional[str]:
    """The DeepSpeed JSON an accelerate config names, made absolute (the config's relative path
    would otherwise be read from wherever the job runs)."""
    name = (_read_yaml(config).get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not name:
        return None
    p = Path(name)
    if p.is_absolute():
        return str(p)
    for base in (Path.cwd(), ROOT, config.parent, config.parent.parent):
        if (base / p).is_file():
            return str((base / p).resolve())
    raise UserError(f"{config}: deepspeed_config_file {name} not found (relative to here, the repository or "
                    "the config's folder)")


def port_for(job_id: str | int) -> int:
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def accelerate_executable() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def launch_command(spec: JobSpec, machine_rank: int | str, head: str, port: int | str) -> list[str]:
    """The per-node `accelerate launch ... train.py ...` command."""
    world = spec.world_size
    cmd = [*accelerate_executable(), "launch", "--config_file", spec.accelerate_config,
           "--num_machines", str(spec.nodes), "--machine_rank", str(machine_rank),
           "--main_process_ip", str(head), "--main_process_port", str(port),
           "--num_processes", str(world)]
    if spec.nodes > 1:
        cmd += ["--rdzv_backend", "static", "--same_network"]
        if is_deepspeed_config(spec.accelerate_config):
            cmd += ["--deepspeed_multinode_launcher", "standard"]  # one launch per node, no pdsh/ssh
    if spec.deepspeed_config_file:
        cmd += ["--deepspeed_config_file", spec.deepspeed_config_file]
    return cmd + [str(TRAIN_PY), *spec.train_args,
                  "--resume_from_checkpoint", "latest", "--expected_world_size", str(world)]


def _launcher_preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
    # The launcher (accelerate launch / torchrun) would die of USR2; ignored, the disposition is
    # inherited by the training processes until train.py installs its own handler.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:  # Linux: if this task dies, the launcher gets SIGTERM and stops its workers
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


class TrainJob(submitit.helpers.Checkpointable):
    """One training run: called once per node (task) of the job."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.requeues = 0  # requeues done through checkpoint() (where SLURM_RESTART_COUNT is absent)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._returncode: Optional[int] = None
        self._signalled = False
        self._terminated = False
        self._latest_before: Optional[str] = None

    def __getstate__(self) -> dict:  # the running child and its thread are not part of the job
        return {"spec": self.spec, "requeues": self.requeues}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # ---------------------------------------------------------------- where this task stands
    def restart_count(self) -> int:
        value = os.environ.get("SLURM_RESTART_COUNT")
        return int(value) if value and value.isdigit() else self.requeues

    def topology(self, env) -> tuple[int, int, str, str]:
        """(machine rank, number of machines, head address, job id) of this task."""
        if self.spec.cluster == "local":  # every task stands for one node on this machine
            rank, count, head = env.global_rank, env.num_tasks, "127.0.0.1"
        else:
            if env.num_tasks != env.num_nodes:
                raise JobSetupError(f"expected one task per node, the job has {env.num_tasks} tasks on "
                                    f"{env.num_nodes} nodes")
            rank, count, head = env.node, env.num_nodes, env.hostnames[0]
        return rank, count, self.spec.main_process_ip or head, str(getattr(env, "raw_job_id", env.job_id))

    def _check_gpus(self) -> None:
        if self.spec.gpus_per_node <= 0:
            return
        import torch

        seen = torch.cuda.device_count()
        if seen != self.spec.gpus_per_node:
            raise JobSetupError(f"this node shows {seen} GPU(s) but the job asked for --gpus_per_node "
                                f"{self.spec.gpus_per_node} (CUDA_VISIBLE_DEVICES="
                                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")

    def _latest(self) -> Optional[str]:
        latest = latest_checkpoint(self.spec.output_dir)  # the loop's own lookup (a stale pointer falls back)
        return latest.name if latest is not None else None

    # ---------------------------------------------------------------- the run
    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        rank, count, head, job_id = self.topology(env)
        port = port_for(job_id)
        restarts = self.restart_count()
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        where = f"node {rank} of {count} ({host})"
        if self.spec.cluster == "slurm":
            count_text = f"SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')}"
        else:
            count_text = f"restart {restarts}"
        _say(f"job {env.job_id}, {where}, {count_text}" + (f", requeued {restarts} time(s)" if restarts else ""))
        if count != self.spec.nodes:
            raise JobSetupError(f"the job asked for {self.spec.nodes} node(s) but this task sees {count}; "
                                "one task per node is required (ntasks-per-node=1)")
        self._check_gpus()
        cmd = launch_command(self.spec, rank, head, port)
        _say(f"world size {self.spec.world_size} ({count} node(s) x {self.spec.procs_per_node}), "
             f"head {head}:{port}")
        _say("launch: " + shlex.join(cmd))
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.spec.run_id:
            child_env.setdefault("WANDB_RUN_ID", self.spec.run_id)
            child_env.setdefault("WANDB_RESUME", "allow")
        self._latest_before = self._latest()
        previous = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: self._on_signal(signum, frame, previous))
        previous_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: self._on_term(signum, frame, previous_term))
        self._proc = subprocess.Popen(cmd, cwd=self.spec.workdir, env=child_env, preexec_fn=_launcher_preexec)
        threading.Thread(target=self._reap, daemon=True).start()
        try:
            while self._returncode is None:
                time.sleep(0.5)
        finally:
            if self._returncode is None:  # interrupted (KeyboardInterrupt, exception): stop the tree
                self._terminate_tree()
        rc = self._returncode
        if rc == 0:
            _say(f"training finished on node {rank}")
            return {"status": "finished", "node": rank, "output_dir": self.spec.output_dir, "name": self.spec.name}
        if self._signalled:  # the head task requeues the job; the other nodes are done for this run
            _say(f"node {rank} stopped after a checkpoint (status {rc})")
            return {"status": "checkpointed", "node": rank, "output_dir": self.spec.output_dir,
                    "name": self.spec.name}
        if self._terminated:
            # SIGTERM: a preemption that Slurm requeues itself, or a cancellation. Either way Slurm
            # ends this run; leaving no result keeps the job open for the requeued run.
            _say(f"node {rank} stopped on SIGTERM (status {rc}); waiting for Slurm to requeue or end the job")
            time.sleep(600)
        raise TrainingFailed(f"training exited with status {rc} on node {rank}; see the messages above")

    def _reap(self) -> None:
        self._returncode = self._proc.wait()

    def _tree(self) -> list:
        import psutil

        try:
            parent = psutil.Process(self._proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []

    def _forward(self, signum: int) -> None:
        import psutil

        for proc in self._tree():
            try:
                proc.send_signal(signum)
            except psutil.Error:
                pass

    def _terminate_tree(self) -> None:
        self._forward(signal.SIGTERM)

    def wait_for_checkpoint(self, timeout_s: float) -> Optional[int]:
        """Keep telling the training processes to stop (one still loading has no handler yet
        and would miss a single signal) until the launcher exits; its status, or None."""
        deadline = time.monotonic() + timeout_s
        next_forward = 0.0
        while self._returncode is None and time.monotonic() < deadline:
            if time.monotonic() >= next_forward:
                self._forward(signal.SIGUSR2)
                next_forward = time.monotonic() + 2.0
            time.sleep(0.2)
        return self._returncode

    def _on_signal(self, signum, frame, previous) -> None:
        if self._signalled:
            return
        self._signalled = True
        _say(f"got {signal.Signals(signum).name} (preemption or time limit): waiting for the training "
             "processes to checkpoint")
        rc = self.wait_for_checkpoint(self._wait_budget())
        if rc == 0:
            _say("training had finished: nothing to requeue")
            return
        if callable(previous):  # submitit: the head task calls checkpoint() and requeues the job
            previous(signum, frame)

    def _on_term(self, signum, frame, previous) -> None:
        self._terminated = True  # the training processes got it too (they checkpoint on SIGTERM)
        if callable(previous):
            previous(signum, frame)

    def _wait_budget(self) -> float:
        return max(10.0, self.spec.signal_delay_s - 10.0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on the head task after USR2: wait until training has saved its
        checkpoint and stopped, then hand submitit the job to requeue (itself)."""
        rc = self.wait_for_checkpoint(self._wait_budget()) if self._proc is not None else None
        latest = self._latest()
        if latest and latest != self._latest_before:
            _say(f"checkpoint saved: {Path(self.spec.output_dir) / 'checkpoints' / latest}")
        elif rc is None and self._proc is not None:
            _say("training did not stop in time; requeueing anyway (it resumes from the last checkpoint)")
        else:
            _say(f"no new checkpoint (status {rc}); the requeued job resumes from {latest or 'the start'}")
        done = self.restart_count()
        if done >= self.spec.max_requeues:
            raise NotRequeued(f"stopped by preemption or the time limit after {done} requeue(s) (--max_requeues "
                              f"{self.spec.max_requeues}): not requeued again. The checkpoint in "
                              f"{self.spec.output_dir}/checkpoints is intact; submit the same command to continue")
        state = type(self).__new__(type(self))  # the same kind of job (a search's trial stays one)
        state.__setstate__({**self.__getstate__(), "requeues": done + 1})
        _say(f"requeueing (requeue {done + 1} of at most {self.spec.max_requeues})")
        return submitit.helpers.DelayedSubmission(state, *args, **kwargs)


# ------------------------------------------------------------------ sweeps
def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _name_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else format_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)


def point_name(point: dict) -> str:
    """Folder name of a sweep point, from its values (like key=value,key=value)."""
    return ",".join(f"{k}={_name_value(v)}" for k, v in point.items())


def _draw(spec: Any, rng: random.Random, key: str) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if kind in ("uniform", "log_uniform") and isinstance(bounds, list) and len(bounds) == 2:
            lo, hi = (float(b) for b in bounds)
            if kind == "uniform":
                return float(f"{rng.uniform(lo, hi):.3g}")
            if lo <= 0 or hi <= 0:
                raise UserError(f"sweep: {key}: log_uniform bounds must be > 0")
            return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
    raise UserError(f"sweep: {key}: give a list of values, or (with random:) {{uniform: [lo, hi]}} or "
                    "{log_uniform: [lo, hi]}")


def expand_sweep(path: str | os.PathLike) -> tuple[str, list[dict], dict]:
    """The sweep's name, its points (each a dict of train flags, named by point_name) and the
    flags every point gets (``fixed``)."""
    import itertools

    from fine_tune.core.config import load_yaml

    data = load_yaml(path, "--sweep", mapping=False)  # the check below says what a sweep file holds
    unknown = set(data) - {"name", "grid", "random", "seed", "fixed"}
    if unknown or not isinstance(data.get("grid"), dict) or not data["grid"]:
        raise UserError(f"--sweep {path}: expected a mapping with 'grid' (flag: [values]) and optionally "
                        "'random', 'seed', 'fixed', 'name'" + (f"; unknown keys: {sorted(unknown)}" if unknown else ""))
    grid: dict = data["grid"]
    fixed: dict = data.get("fixed") or {}
    n_random = data.get("random")
    if n_random is None:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"sweep: {key}: a grid needs a non-empty list of values (distributions need random: N)")
        points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    else:
        if not isinstance(n_random, int) or n_random < 1:
            raise UserError(f"sweep: random must be a positive integer, not {n_random!r}")
        rng = random.Random(data.get("seed", 0))
        points, seen = [], set()
        for _ in range(100 * n_random):
            point = {key: _draw(spec, rng, key) for key, spec in grid.items()}
            name = point_name(point)
            if name not in seen:
                seen.add(name)
                points.append(point)
            if len(points) == n_random:
                break
    if not isinstance(fixed, dict):
        raise UserError(f"--sweep {path}: 'fixed' must be a mapping of flag: value")
    return str(data.get("name") or Path(path).stem), points, fixed


def check_distinct_folders(points: list[dict]) -> None:
    """Two points of a sweep must never share an output folder (they would lock each other out,
    or one would resume the other): values that clean to the same name, or one value written
    twice (2.0e-5 and 0.00002), are refused before anything is submitted."""
    by_name: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_name.setdefault(point_name(point), []).append(i)
    for name, idx in by_name.items():
        if len(idx) > 1:
            shown = " and ".join(f"point {i + 1} ({', '.join(f'{k}: {format_value(v)}' for k, v in points[i].items())})"
                                 for i in idx)
            raise UserError(f"sweep: {shown} would write to the same folder {name}; make the values distinct "
                            "(a value written twice, or values that differ only in characters a folder name drops)")


def point_flags(point: dict) -> list[str]:
    flags = []
    for key, value in point.items():
        flags += [f"--{key}", format_value(value)]
    return flags


def _has_flag(args: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def _without_flag(args: list[str], name: str) -> list[str]:
    """The flags without any `--name value` / `--name=value` (we set that one ourselves)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == f"--{name}":
            skip = True
        elif not a.startswith(f"--{name}="):
            out.append(a)
    return out


# ------------------------------------------------------------------ submission
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurm/submit.py",
        usage="python slurm/submit.py [options] -- [train.py flags]",
        description="Submit train.py as a Slurm job through submitit: one task per node, each running its own "
                    "`accelerate launch`; requeued and resumed after preemption or a time limit. With --sweep, "
                    "one job array over a grid of train.py flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (one task each)")
    g.add_argument("--gpus_per_node", type=int, default=0,
                   help="GPUs per node = training processes per node; 0: CPU nodes, one process each")
    g.add_argument("--cpus_per_task", type=int, default=None, help="CPUs per node's task")
    g.add_argument("--mem_gb", type=float, default=None, help="memory per node, GB")
    g.add_argument("--time", type=int, default=60, help="time limit in minutes (per run; a requeue starts afresh)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--job_name", default=None, help="default: the output directory's name")
    g = p.add_argument_group("launch")
    g.add_argument("--accelerate_config", default=DEFAULT_ACCELERATE_CONFIG,
                   help="accelerate config (multi_node_ddp.yaml or multi_node_deepspeed.yaml; machine rank, "
                        "address, port and process count are filled in per node)")
    g.add_argument("--setup", action="append", default=[],
                   help="shell line run before training, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--main_process_ip", default=None, help="address of the head node (default: its host name)")
    g.add_argument("--log_dir", default=None,
                   help="where submitit's folders go (a fresh one per submission); default OUTPUT_DIR/slurm_logs")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="'local' runs the same job through submitit's local executor (no Slurm); each node is "
                        "then a group of processes on this machine")
    g = p.add_argument_group("preemption")
    g.add_argument("--max_requeues", type=int, default=10,
                   help="requeue after preemption or a time limit at most this many times")
    g.add_argument("--signal_delay_s", type=int, default=None,
                   help="USR2 comes this many seconds before the time limit (default: 180, at most half the "
                        "time: a 7B ZeRO checkpoint's projected save plus a step, docs/reliability.md)")
    g = p.add_argument_group("sweeps")
    g.add_argument("--sweep", default=None, help="sweep YAML (slurm/sweeps/*.yaml): one job array, one output "
                                                 "directory per point under --output_dir")
    g.add_argument("--array_parallelism", type=int, default=None, help="sweep points (or search trials) running "
                                                                      "at once")
    g.add_argument("--search", default=None,
                   help="search YAML (slurm/searches/*.yaml): an Optuna study, one trial per array task, each in "
                        "OUTPUT_DIR/trial_<N>; bad trials pruned; run the same command again to continue it")
    g = p.add_argument_group("this command")
    g.add_argument("--dry_run", action="store_true",
                   help="print the sbatch script and the per-node commands; submit nothing")
    g.add_argument("--wait", action="store_true",
                   help="follow the job to its end, print the head node's log, exit with the job's status")
    return p


@dataclass
class Submission:
    """A parsed command line: the job(s) to submit and how."""
    opts: argparse.Namespace
    specs: list  # one JobSpec per run (sweep point)
    folder: Path
    output_dir: Path
    sweep_name: Optional[str] = None
    search: Any = None  # a search.SearchSpec with --search: specs[0] is then the trials' common JobSpec

    @property
    def is_sweep(self) -> bool:
        return self.sweep_name is not None

    @property
    def is_array(self) -> bool:
        return self.is_sweep or self.search is not None


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _resolve_config(path: str) -> Path:
    p = Path(path)
    for candidate in (p, ROOT / p):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"--accelerate_config {path}: no such file (see {ROOT / 'accelerate_configs'})")


def parse_submission(argv: list[str], stamp: Optional[str] = None) -> Submission:
    own, train = split_argv(argv)
    parser = build_parser()

    def error(message):
        raise UserError(message + " (options before --, train.py flags after it)")

    parser.error = error  # type: ignore[method-assign]
    opts = parser.parse_args(own)
    if opts.nodes < 1 or opts.gpus_per_node < 0 or opts.time < 1 or opts.max_requeues < 0:
        raise UserError("--nodes and --time must be >= 1, --gpus_per_node and --max_requeues >= 0")
    if opts.cluster == "local" and opts.nodes > 1 and opts.gpus_per_node > 0:
        raise UserError("--cluster local emulates several nodes on CPU only; use --nodes 1 with GPUs")
    if opts.signal_delay_s is None:
        opts.signal_delay_s = max(5, min(180, opts.time * 30))
    if opts.signal_delay_s >= opts.time * 60:
        raise UserError(f"--signal_delay_s {opts.signal_delay_s} must be shorter than --time ({opts.time * 60} s)")
    for flag in ("expected_world_size",):
        if _has_flag(train, flag):
            raise UserError(f"--{flag} is set per job by slurm/submit.py; leave it out")
    accelerate_config = _resolve_config(opts.accelerate_config)
    base = parse_args(train)  # the train flags are checked before anything is submitted
    output_dir = Path(base.output_dir).resolve()
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    log_dir = Path(opts.log_dir).resolve() if opts.log_dir else output_dir / "slurm_logs"
    folder = log_dir / stamp
    common = dict(accelerate_config=str(accelerate_config), nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                  main_process_ip=opts.main_process_ip, max_requeues=opts.max_requeues,
                  signal_delay_s=opts.signal_delay_s, cluster=opts.cluster,
                  deepspeed_config_file=deepspeed_json(accelerate_config))
    run_tag = re.sub(r"[^A-Za-z0-9]", "", stamp)
    if _has_flag(train, "resume_from_checkpoint"):
        print(f"{PREFIX} note: every run resumes from its own latest checkpoint (--resume_from_checkpoint "
              "latest); the given --resume_from_checkpoint is ignored", file=sys.stderr)
    train = _without_flag(_without_flag(train, "output_dir"), "resume_from_checkpoint")
    if opts.sweep is not None and opts.search is not None:
        raise UserError("--sweep and --search: give one of them")
    search = None
    if opts.search is not None:
        from fine_tune.launchers.search import check_search

        search = check_search(opts.search, train, output_dir)
        specs = [JobSpec(train_args=train, output_dir=str(output_dir), **common)]
        sweep_name = None
    elif opts.sweep is None:
        args = [*train, "--output_dir", str(output_dir)]
        specs = [JobSpec(train_args=args, output_dir=str(output_dir), run_id=f"{run_tag}r0", **common)]
        sweep_name = None
    else:
        sweep_name, points, fixed = expand_sweep(opts.sweep)
        specs = []
        for i, point in enumerate(points):
            name = point_name(point)
            out = output_dir / name
            args = [*train, *point_flags(fixed), *point_flags(point), "--output_dir", str(out)]
            if not _has_flag(train, "wandb_group"):
                args += ["--wandb_group", sweep_name]
            if not _has_flag(train, "run_name"):
                args += ["--run_name", name]
            try:
                parse_args(args)
            except ConfigError as e:
                raise UserError(f"sweep point {name}: {e}") from None
            specs.append(JobSpec(train_args=args, output_dir=str(out), name=name, run_id=f"{run_tag}r{i}", **common))
        check_distinct_folders(points)
    if opts.job_name is None:
        opts.job_name = sweep_name or (search.name if search else None) or output_dir.name or "fine_tune"
    return Submission(opts=opts, specs=specs, folder=folder, output_dir=output_dir, sweep_name=sweep_name,
                      search=search)


def executor_parameters(sub: Submission) -> dict:
    """submitit SlurmExecutor parameters (sbatch options) for this submission."""
    o = sub.opts
    params: dict = {"job_name": o.job_name, "time": o.time, "nodes": o.nodes, "ntasks_per_node": 1,
                    "signal_delay_s": o.signal_delay_s, "stderr_to_stdout": True,
                    "srun_args": ["--kill-on-bad-exit=1"], "additional_parameters": {"requeue": True},
                    "setup": setup_lines(o.setup)}
    if o.gpus_per_node:
        params["gpus_per_node"] = o.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(o, key) is not None:
            params[key] = getattr(o, key)
    if o.mem_gb is not None:
        params["mem"] = f"{int(o.mem_gb)}GB" if float(o.mem_gb).is_integer() else f"{int(o.mem_gb * 1024)}MB"
    if sub.is_array and o.array_parallelism:
        params["array_parallelism"] = o.array_parallelism
    return params


def setup_lines(user_lines: list[str]) -> list[str]:
    # the nodes run this Python (sys.executable), where the package is installed: no PYTHONPATH needed
    return list(user_lines)


def make_executor(sub: Submission):
    o = sub.opts
    sub.folder.mkdir(parents=True, exist_ok=False)
    if o.cluster == "local":
        ex = submitit.LocalExecutor(folder=sub.folder, max_num_timeout=o.max_requeues + 1)
        ex.update_parameters(timeout_min=o.time, tasks_per_node=o.nodes, signal_delay_s=o.signal_delay_s,
                             stderr_to_stdout=True, setup=setup_lines(o.setup))
        return ex
    if not submitit.SlurmExecutor.affinity() > 0:
        raise UserError("no Slurm here (srun not found): use --cluster local, or start slurm/dev_cluster.sh")
    ex = submitit.SlurmExecutor(folder=sub.folder, max_num_timeout=o.max_requeues + 1)
    ex.update_parameters(**executor_parameters(sub))
    return ex


def sbatch_text(sub: Submission) -> str:
    """The sbatch script submitit writes for this submission.

    submitit has no public way to render its script without submitting, so the dry run calls
    the private function its executor uses (and the command line it runs); tests pin the text,
    so a submitit upgrade that changes either fails there, not on a cluster."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(sub)
    count = sub.search.trials if sub.search is not None else len(sub.specs)
    if sub.is_array and count > 1:
        params["map_count"] = count
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(sub.folder))])
    return _make_sbatch_string(command=command, folder=sub.folder, **params)


def dry_run_text(sub: Submission) -> str:
    o = sub.opts
    head = o.main_process_ip or "$HEAD_NODE"
    what = f"job array of {len(sub.specs)} runs" if sub.is_sweep else "one job"
    lines = [f"# dry run: nothing submitted ({what}, "
             f"{o.nodes} node(s) x {max(o.gpus_per_node, 1)} process(es), cluster {o.cluster})",
             f"# submitit folder: {sub.folder}", "", "# ---- sbatch script", sbatch_text(sub).rstrip(), "",
             "# ---- per-node commands (each node's task builds its own; $HEAD_NODE = the job's first host,",
             f"#      $PORT = {PORT_BASE} + job id % {PORT_SPAN})"]
    for spec in sub.specs:
        if sub.is_sweep:
            lines.append(f"# run {spec.name}: {spec.output_dir}")
        for rank in range(spec.nodes):
            cmd = launch_command(spec, rank, "HEAD_NODE_PLACEHOLDER", "PORT_PLACEHOLDER")
            text = shlex.join(cmd).replace("HEAD_NODE_PLACEHOLDER", head).replace("PORT_PLACEHOLDER", "$PORT")
            lines.append(f"node {rank}: {text}")
    return "\n".join(lines) + "\n"


def job_log(job, task: int = 0) -> Path:
    return submitit.core.utils.JobPaths(job.paths.folder, job_id=job.job_id, task_id=task).stdout


def submit(sub: Submission) -> list:
    ex = make_executor(sub)
    if sub.is_sweep:
        with ex.batch():
            jobs = [ex.submit(TrainJob(spec)) for spec in sub.specs]
    else:
        jobs = [ex.submit(TrainJob(sub.specs[0]))]
    return jobs


def describe(sub: Submission, jobs: list) -> str:
    o = sub.opts
    lines = []
    shape = f"{o.nodes} node(s) x {max(o.gpus_per_node, 1)} process(es)"
    if sub.is_sweep:
        array_id = str(jobs[0].job_id).split("_")[0]
        lines.append(f"submitted job array {array_id}: sweep {sub.sweep_name}, {len(jobs)} runs, {shape} each "
                     f"({o.cluster})")
        lines.append(f"output directory: {sub.output_dir}")
        for job, spec in zip(jobs, sub.specs):
            lines.append(f"  job {job.job_id}: {spec.name}")
            lines.append(f"    output {spec.output_dir}")
            lines.append(f"    log    {job_log(job)}")
    else:
        job = jobs[0]
        lines.append(f"submitted job {job.job_id}: {shape}, {Path(sub.specs[0].accelerate_config).name} ({o.cluster})")
        lines.append(f"output directory: {sub.output_dir}")
        lines.append(f"log (head node): {job_log(job)}")
        for k in range(1, o.nodes):
            lines.append(f"log (node {k}):    {job_log(job, k)}")
    if o.cluster == "slurm":
        ids = " ".join(sorted({str(j.job_id).split('_')[0] for j in jobs}))
        lines.append(f"follow: tail -f {job_log(jobs[0])}    status: squeue -j {ids}    cancel: scancel {ids}")
    return "\n".join(lines)


# ------------------------------------------------------------------ following a job
def slurm_state(job_id: str) -> dict:
    """JobState, Restarts, ... from `scontrol show job` ({} once Slurm forgot the job)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    fields = {}
    for token in out.stdout.split():
        if "=" in token:
            k, v = token.split("=", 1)
            fields.setdefault(k, v)
    return fields


def read_result(job) -> Optional[tuple]:
    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        return submitit.core.utils.pickle_load(path)
    except Exception:  # noqa: BLE001 - being written
        return None


class LogFollower:
    def __init__(self, path: Path, prefix: str = ""):
        self.path, self.prefix, self.offset, self.partial = path, prefix, 0, ""

    def poll(self) -> None:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except OSError:
            return
        text = self.partial + text
        *lines, self.partial = text.split("\n")
        for line in lines:
            print(self.prefix + line, flush=True)

    def flush(self) -> None:
        self.poll()
        if self.partial:
            print(self.prefix + self.partial, flush=True)
            self.partial = ""


class JobWatch:
    """Follow submitted jobs: stream their head nodes' logs, say when their Slurm state changes,
    and collect each job's end (0 finished, 1 failed, EXIT_CHECKPOINTED stopped after
    --max_requeues). Jobs may be added while others run (a local search keeps N running)."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self.jobs: list = []
        self.tags: list[str] = []
        self.followers: list[LogFollower] = []
        self.pending: set[int] = set()
        self.last_state: dict[int, str] = {}
        self.gone_since: dict[int, float] = {}

    def add(self, job, tag: str, log_prefix: str = "") -> int:
        self.jobs.append(job)
        self.tags.append(tag)
        self.followers.append(LogFollower(job_log(job), log_prefix))
        self.pending.add(len(self.jobs) - 1)
        return len(self.jobs) - 1

    def _result(self, i: int) -> Optional[tuple]:
        job = self.jobs[i]
        result = read_result(job)
        if result is None and self.cluster == "local" and job.done():
            time.sleep(1.0)
            result = read_result(job) or ("error", "the local job ended without a result")
        if result is None and self.cluster == "slurm":
            info = slurm_state(job.job_id)
            state = info.get("JobState", "")
            shown = f"{state} (restarts {info.get('Restarts', '0')})" if state else ""
            if shown and shown != self.last_state.get(i):
                self.last_state[i] = shown
                print(f"{PREFIX} {self.tags[i]}: {state.lower()}"
                      + (f", requeued {info['Restarts']} time(s)" if info.get("Restarts", "0") != "0" else ""),
                      flush=True)
            if not state or state in FINAL_STATES:
                self.gone_since.setdefault(i, time.monotonic())
                if time.monotonic() - self.gone_since[i] > 10:
                    result = ("error", f"Slurm reports {state or 'no such job'} "
                                       f"(exit code {info.get('ExitCode', '?')}) and the job left no result")
            else:
                self.gone_since.pop(i, None)
        return result

    def poll(self) -> list[tuple[int, int, Any]]:
        """(index, status, result value) of the jobs that ended since the last call."""
        for f in self.followers:
            f.poll()
        ended = []
        for i in sorted(self.pending):
            result = self._result(i)
            if result is None:
                continue
            self.pending.discard(i)
            self.followers[i].flush()
            kind, value = result
            if kind == "success":
                status = 0
                print(f"{PREFIX} {self.tags[i]}: finished", flush=True)
            else:
                text = str(value).strip()
                last = text.splitlines()[-1] if text else "failed"
                status = EXIT_CHECKPOINTED if "NotRequeued" in text else 1
                print(f"{PREFIX} {self.tags[i]}: {'stopped' if status == EXIT_CHECKPOINTED else 'failed'}: {last}",
                      file=sys.stderr, flush=True)
            ended.append((i, status, value))
        return ended


def follow(sub: Submission, jobs: list, poll_s: float = 1.0) -> int:
    """Stream the head nodes' logs until every job ends; the exit status (0, 1 or EXIT_CHECKPOINTED)."""
    watch = JobWatch(sub.opts.cluster)
    for job, spec in zip(jobs, sub.specs):
        watch.add(job, f"job {job.job_id}" + (f" ({spec.name})" if sub.is_sweep else ""),
                  f"[{spec.name}] " if sub.is_sweep else "")
    statuses: dict[int, int] = {}
    while watch.pending:
        time.sleep(poll_s)
        statuses.update((i, status) for i, status, _ in watch.poll())
    if sub.is_sweep:
        print_comparison([Path(s.output_dir) for s in sub.specs])
        return 0 if all(s == 0 for s in statuses.values()) else 1
    return statuses[0]


def print_comparison(run_dirs: list[Path]) -> None:
    """The sweep's comparison table (fine_tune.commands.compare's)."""
    from fine_tune.commands import compare

    started = [d for d in run_dirs if (d / "config.yaml").exists()]  # a point that failed at start holds no run
    missing = sorted(d.name for d in run_dirs if d not in started)
    print(f"{PREFIX} comparison of {len(started)} runs" + (f" (no run in: {', '.join(missing)})" if missing else ""),
          flush=True)
    if started:
        print(compare.table([str(d) for d in started]), flush=True)


# ------------------------------------------------------------------ entry point
@main_guard
def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return
    sub = parse_submission(argv, stamp="dry_run" if "--dry_run" in split_argv(argv)[0] else None)
    if sub.search is not None:
        from fine_tune.launchers.search import run_search

        sys.exit(run_search(sub))
    if sub.opts.dry_run:
        sys.stdout.write(dry_run_text(sub))
        return
    jobs = submit(sub)
    print(describe(sub, jobs), flush=True)
    if not sub.opts.wait:
        return
    try:
        status = follow(sub, jobs)
    except KeyboardInterrupt:
        print(f"\n{PREFIX} stopped following; the job keeps running", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    from fine_tune.launchers.slurm import main as _main  # the importable module, so that jobs unpickle on the nodes

    _main()
