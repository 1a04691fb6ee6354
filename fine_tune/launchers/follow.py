"""Following submitted jobs: their head nodes' logs streamed here, their Slurm states, their
ends (0 finished, 1 failed, EXIT_CHECKPOINTED stopped after --max_requeues) and, after a
sweep, the comparison table."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import submitit

from fine_tune import EXIT_CHECKPOINTED
from fine_tune.launchers.job import PREFIX

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "PREEMPTED", "SPECIAL_EXIT"}


def job_log(job, task: int = 0) -> Path:
    return submitit.core.utils.JobPaths(job.paths.folder, job_id=job.job_id, task_id=task).stdout


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


def follow(sub, jobs: list, poll_s: float = 1.0) -> int:
    """Stream the head nodes' logs of a submission's jobs until every job ends; the exit
    status (0, 1 or EXIT_CHECKPOINTED)."""
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
    """The sweep's comparison table (the one `fine-tune compare` prints)."""
    from fine_tune.core.comparison import table

    started = [d for d in run_dirs if (d / "config.yaml").exists()]  # a point that failed at start holds no run
    missing = sorted(d.name for d in run_dirs if d not in started)
    print(f"{PREFIX} comparison of {len(started)} runs" + (f" (no run in: {', '.join(missing)})" if missing else ""),
          flush=True)
    if started:
        print(table([str(d) for d in started]), flush=True)
