"""Submission: the command line of ``fine-tune submit`` (and ``python slurm/submit.py``) read
into one :class:`Submission`, turned into submitit's executor, a dry run's text, or submitted
jobs."""

from __future__ import annotations

import argparse
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import submitit

from fine_tune.core.config import ConfigError, parse_args
from fine_tune.core.errors import UserError
from fine_tune.launchers.follow import job_log
from fine_tune.launchers.job import PORT_BASE, PORT_SPAN, PREFIX, ROOT, JobSpec, TrainJob, launch_command, read_yaml
from fine_tune.launchers.search_spec import check_search
from fine_tune.launchers.sweeps import (check_distinct_folders, expand_sweep, has_flag, point_flags, point_name,
                                        without_flag)

DEFAULT_ACCELERATE_CONFIG = "accelerate_configs/multi_node_ddp.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fine-tune submit",
        usage="fine-tune submit [options] -- [train.py flags]",
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


def deepspeed_json(config: Path) -> Optional[str]:
    """The DeepSpeed JSON an accelerate config names, made absolute (the config's relative path
    would otherwise be read from wherever the job runs)."""
    name = (read_yaml(config).get("deepspeed_config") or {}).get("deepspeed_config_file")
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


def parse_options(own: list[str]) -> argparse.Namespace:
    """The launcher's own options (those before ``--``), checked."""
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
    return opts


def parse_submission(argv: list[str], stamp: Optional[str] = None) -> Submission:
    own, train = split_argv(argv)
    opts = parse_options(own)
    for flag in ("expected_world_size",):
        if has_flag(train, flag):
            raise UserError(f"--{flag} is set per job by fine-tune submit; leave it out")
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
    if has_flag(train, "resume_from_checkpoint"):
        print(f"{PREFIX} note: every run resumes from its own latest checkpoint (--resume_from_checkpoint "
              "latest); the given --resume_from_checkpoint is ignored", file=sys.stderr)
    train = without_flag(without_flag(train, "output_dir"), "resume_from_checkpoint")
    if opts.sweep is not None and opts.search is not None:
        raise UserError("--sweep and --search: give one of them")
    search, sweep_name = None, None
    if opts.search is not None:
        search = check_search(opts.search, train, output_dir)
        specs = [JobSpec(train_args=train, output_dir=str(output_dir), **common)]
    elif opts.sweep is None:
        args = [*train, "--output_dir", str(output_dir)]
        specs = [JobSpec(train_args=args, output_dir=str(output_dir), run_id=f"{run_tag}r0", **common)]
    else:
        sweep_name, specs = sweep_specs(opts.sweep, train, output_dir, run_tag, common)
    if opts.job_name is None:
        opts.job_name = sweep_name or (search.name if search else None) or output_dir.name or "fine_tune"
    return Submission(opts=opts, specs=specs, folder=folder, output_dir=output_dir, sweep_name=sweep_name,
                      search=search)


def sweep_specs(path: str, train: list[str], output_dir: Path, run_tag: str, common: dict) -> tuple[str, list]:
    """The sweep's name and one JobSpec per point, each point's train flags checked."""
    sweep_name, points, fixed = expand_sweep(path)
    specs = []
    for i, point in enumerate(points):
        name = point_name(point)
        out = output_dir / name
        args = [*train, *point_flags(fixed), *point_flags(point), "--output_dir", str(out)]
        if not has_flag(train, "wandb_group"):
            args += ["--wandb_group", sweep_name]
        if not has_flag(train, "run_name"):
            args += ["--run_name", name]
        try:
            parse_args(args)
        except ConfigError as e:
            raise UserError(f"sweep point {name}: {e}") from None
        specs.append(JobSpec(train_args=args, output_dir=str(out), name=name, run_id=f"{run_tag}r{i}", **common))
    check_distinct_folders(points)
    return sweep_name, specs


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
