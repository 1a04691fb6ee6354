"""What every node of a Slurm job runs: one submitit task per node starts that node's share of
one training run.

Each task reads its place in the job from ``submitit.JobEnvironment`` (the head node is the
first host, the machine rank is the node index) and starts its own ``accelerate launch`` with
``--resume_from_checkpoint latest`` and ``--expected_world_size`` added, so a requeued job
continues where it stopped and a job that sees fewer processes than it asked for fails at
start-up. Nothing per node is expanded in a batch shell, which is how every node ends up
claiming rank 0 (accelerate #2816).

Preemption and time limits: Slurm sends USR2 (``--signal=USR2@signal_delay_s``) to every
process of the job step, training processes included; the launcher is started with USR2
ignored (``accelerate launch`` and torchrun would die of it, and do not forward it), the
task forwards it to the training processes again until they stop (one that is still
loading would miss it), every rank checkpoints at the same optimizer step and exits, and
the head task's :meth:`TrainJob.checkpoint` requeues the job (at most ``--max_requeues``
times, counted by ``SLURM_RESTART_COUNT``).

A job is pickled with its class's module path and unpickled on the nodes, so TrainJob lives
here, in an importable module, and never in a script.
"""

from __future__ import annotations

import os
import re
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

from fine_tune.core.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "train.py"
PORT_BASE, PORT_SPAN = 15000, 10000  # main process port = 15000 + job id % 10000 (Lightning's rule)
PREFIX = "[fine_tune.launchers.slurm]"  # of every line the launcher prints (logs are grepped for it)


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


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_deepspeed_config(path: str | os.PathLike) -> bool:
    return str(read_yaml(path).get("distributed_type", "")).upper() == "DEEPSPEED"


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
