"""Hyper-parameter search that learns: an Optuna study whose trials run as submitit job arrays
(or locally), pruned through the loop, resumable after preemption.

    fine-tune submit --search slurm/searches/sentiment.yaml [slurm options] -- [train flags]

The search folder (the common ``--output_dir``) holds the study (``study.journal``, Optuna's
journal file storage: no server, safe on a shared filesystem), a copy of the search file
(``search.yaml``), one run folder per trial (``trial_<N>``) and, at the end, the report
(``report.md``) and the plot (``objective.png``).

One array task trains one trial. Its head task claims a trial under a file lock: the trial its
job already held (a job that Slurm requeued), else a trial whose job is gone (the submitter
or the job was killed: the new task resumes that trial's checkpoint under the same number),
else a new one from the sampler while the study has fewer than ``trials``. So re-running
the same command continues a study and never counts a trial twice.

Pruning: each trial runs ``train.py --eval_hook fine_tune.launchers.search:trial_reporter``.
After each evaluation the loop's main process calls the reporter, which reports the objective
to the trial (Optuna step = the evaluation's number) and asks the pruner; a "stop" travels
with the loop's all-reduced stop vote, so every rank stops at the same step, and the run ends
with ``"status": "pruned"`` in its ``eval_results.json`` (exit status 0, no ``final/``).
The task then marks the trial pruned (or complete with the objective, or failed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import submitit

from fine_tune import EXIT_CHECKPOINTED
from fine_tune.core import plots
from fine_tune.core.errors import UserError
from fine_tune.core.runs import is_run_dir, load_run
from fine_tune.core.tables import fmt_duration
from fine_tune.launchers.follow import JobWatch, job_log, slurm_state
from fine_tune.launchers.job import PREFIX, JobSpec, TrainingFailed, TrainJob
from fine_tune.launchers.search_spec import SearchSpec, distributions, make_pruner, make_sampler, search_from_dict
from fine_tune.launchers.submission import make_executor, sbatch_text
from fine_tune.launchers.sweeps import format_value, has_flag, point_flags

STUDY_FILE = "study.journal"
SEARCH_COPY = "search.yaml"
REPORT_FILE = "report.md"
PLOT_FILE = "objective.png"
STUDY_NAME = "search"
HOOK = "fine_tune.launchers.search:trial_reporter"
# Slurm states in which a job may still run (or run again): its trial is not an orphan
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
                     "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


# ------------------------------------------------------------------ the study
def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage(folder: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(folder / STUDY_FILE)
    # the open-based lock works on NFS (v3 and later), where the symlink lock's default may not
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def read_spec(folder: Path) -> SearchSpec:
    import yaml

    return search_from_dict(yaml.safe_load((folder / SEARCH_COPY).read_text()), str(folder / SEARCH_COPY))


def open_study(folder: str | os.PathLike, spec: Optional[SearchSpec] = None, offset: int = 0):
    """The study of a search folder (with the sampler for trial number ``offset``)."""
    import optuna

    _quiet_optuna()
    folder = Path(folder)
    spec = spec or read_spec(folder)
    return optuna.load_study(study_name=STUDY_NAME, storage=storage(folder), sampler=make_sampler(spec, offset),
                             pruner=make_pruner(spec))


def create_study(folder: Path, spec: SearchSpec, train_args: list[str]) -> None:
    """Create the study, or check that the folder's study is this same search."""
    import optuna
    import yaml

    _quiet_optuna()
    copy = folder / SEARCH_COPY
    if copy.exists():
        before = read_spec(folder)
        held = optuna.load_study(study_name=STUDY_NAME, storage=storage(folder)).user_attrs.get("train_args")
        if before.to_dict() != spec.to_dict() or held != train_args:
            raise UserError(f"{folder} holds another search ({copy}, with other settings or train flags); "
                            "run the same command to continue it, or choose another --output_dir")
        return
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty and holds no search; choose another --output_dir")
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage(folder), direction=spec.direction,
                                load_if_exists=True)
    study.set_user_attr("train_args", train_args)
    copy.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))


def _finished(trial) -> bool:
    return trial.state.is_finished()


def owner_alive(attrs: dict) -> bool:
    """Whether the job that claimed a running trial may still run it."""
    if "job" not in attrs:  # asked, but its task died before it could say so (claims write both under the lock)
        return False
    if attrs.get("cluster") == "slurm":
        state = slurm_state(attrs.get("job", "")).get("JobState")
        return state in LIVE_SLURM_STATES if state is not None else False
    if attrs.get("host") != socket.gethostname():
        return True  # another machine's local job: nothing here can tell
    import psutil

    pid = int(attrs.get("pid", 0))
    try:  # a killed job's process is a zombie until its new parent reaps it: that is not alive
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def study_counts(folder: Path) -> dict:
    """Trials by kind: finished, running with a live job, orphaned (running, its job gone)."""
    study = open_study(folder)
    counts = {"finished": 0, "live": 0, "orphaned": 0}
    for t in study.get_trials(deepcopy=False):
        if _finished(t):
            counts["finished"] += 1
        else:
            counts["live" if owner_alive(t.user_attrs) else "orphaned"] += 1
    return counts


def _claim_lock(folder: Path):
    from optuna.storages.journal import JournalFileOpenLock

    return JournalFileOpenLock(str(folder / "claim"))


def claim_trial(folder: Path, job_key: str, cluster: str) -> Optional[int]:
    """The trial this job trains (see the module's docstring), or None when the study is full."""
    lock = _claim_lock(folder)
    lock.acquire()
    try:
        study = open_study(folder)
        spec = read_spec(folder)
        trials = study.get_trials(deepcopy=False)
        mine = [t for t in trials if not _finished(t) and t.user_attrs.get("job") == job_key]
        orphans = [t for t in trials if not _finished(t) and t.user_attrs.get("job") != job_key
                   and not owner_alive(t.user_attrs)]
        if mine or orphans:
            number = (mine or orphans)[0].number
            if not mine:
                _say(f"trial {number}: its job {orphans[0].user_attrs.get('job')} is gone; this job takes it over "
                     "(it resumes the trial's last checkpoint)")
        elif len(trials) < spec.trials:
            study = open_study(folder, spec, offset=len(trials))
            number = study.ask(distributions(spec)).number
        else:
            return None
        _set_owner(study, number, job_key, cluster)
        return number
    finally:
        lock.release()


def _trial_id(study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def _set_owner(study, number: int, job_key: str, cluster: str) -> None:
    trial_id = _trial_id(study, number)
    for key, value in {"job": job_key, "cluster": cluster, "host": socket.gethostname(), "pid": os.getpid()}.items():
        study._storage.set_trial_user_attr(trial_id, key, value)


def wait_for_claim(folder: Path, job_key: str, timeout_s: float = 300.0) -> Optional[int]:
    """The trial the head task of this job claimed (the other nodes of a multi-node trial)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for t in open_study(folder).get_trials(deepcopy=False):
            if not _finished(t) and t.user_attrs.get("job") == job_key:
                return t.number
        time.sleep(2.0)
    return None


def trial_dir(folder: Path, number: int) -> Path:
    return folder / f"trial_{number}"


def trial_args(base: list[str], folder: Path, number: int, params: dict, name: str) -> list[str]:
    """train.py flags of one trial: the common flags, the trial's values, its folder and the reporter."""
    args = [*base, *point_flags(params), "--output_dir", str(trial_dir(folder, number))]
    if not has_flag(base, "run_name"):
        args += ["--run_name", f"{name}-trial_{number}"]
    if not has_flag(base, "wandb_group"):
        args += ["--wandb_group", name]
    return args + ["--eval_hook", HOOK]


def _say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


# ------------------------------------------------------------------ what every array task runs
class SearchJob(TrainJob):
    """One trial: every node's task of one array element. The head task claims the trial and,
    when training has ended, tells the study its outcome."""

    def __init__(self, spec: JobSpec):
        super().__init__(spec)  # spec: the common flags, output_dir = the search folder
        self.base = spec
        self.trial_number: Optional[int] = None

    def __getstate__(self) -> dict:  # a requeued job keeps its trial
        return {**super().__getstate__(), "base": self.base, "trial_number": self.trial_number}

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        rank = self.topology(env)[0]
        folder = Path(self.base.output_dir)
        job_key = str(env.job_id)
        if self.trial_number is None:
            self.trial_number = claim_trial(folder, job_key, self.base.cluster) if rank == 0 \
                else wait_for_claim(folder, job_key)
        else:  # requeued: the trial is still ours unless a live job took it over meanwhile
            owner = open_study(folder).get_trials(deepcopy=False)[self.trial_number].user_attrs
            if owner.get("job") != job_key and owner_alive(owner):
                _say(f"trial {self.trial_number} was taken over by job {owner.get('job')}: nothing to do")
                return {"status": "nothing to do", "node": rank}
            if rank == 0:
                _set_owner(open_study(folder), self.trial_number, job_key, self.base.cluster)
        if self.trial_number is None:
            _say("the study has all its trials: nothing to do")
            return {"status": "nothing to do", "node": rank}
        number = self.trial_number
        study = open_study(folder)
        trial = study.get_trials(deepcopy=False)[number]
        if _finished(trial):
            _say(f"trial {number} is already {trial.state.name.lower()}: nothing to do")
            return {"status": "nothing to do", "node": rank, "trial": number}
        spec = read_spec(folder)
        args = trial_args(self.base.train_args, folder, number, trial.params, spec.name)
        self.spec = dataclasses.replace(self.base, train_args=args, output_dir=str(trial_dir(folder, number)),
                                        name=f"trial_{number}")
        _say(f"trial {number}: " + ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items()))
        try:
            result = super().__call__()
        except TrainingFailed as e:
            if rank == 0:
                study.tell(number, state=_state("FAIL"))
                _say(f"trial {number}: failed")
            raise e
        if rank == 0 and result["status"] == "finished":
            _say(f"trial {number}: {tell_outcome(study, number, Path(self.spec.output_dir), spec.metric)}")
        return {**result, "trial": number}


def _state(name: str):
    import optuna

    return getattr(optuna.trial.TrialState, name)


def tell_outcome(study, number: int, run_dir: Path, metric: str) -> str:
    """Mark the trial pruned, complete (with the objective) or failed, from its eval_results.json."""
    try:
        results = json.loads((run_dir / "eval_results.json").read_text())
    except (OSError, json.JSONDecodeError):
        results = {}
    trial_id = _trial_id(study, number)
    if results.get("global_step") is not None:
        study._storage.set_trial_user_attr(trial_id, "steps", int(results["global_step"]))
    if results.get("status") == "pruned":
        study.tell(number, state=_state("PRUNED"))
        return f"pruned at step {results.get('global_step')}"
    value = results.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        study.tell(number, state=_state("FAIL"))
        return f"failed: no finite {metric} in {run_dir / 'eval_results.json'}"
    study.tell(number, float(value))
    return f"complete, {metric} {value:.4f}"


# ------------------------------------------------------------------ the reporter train.py calls
def trial_reporter(cfg):
    """``--eval_hook`` factory, run in the trial's main training process: report each evaluation's
    objective to the trial (step = the evaluation's number) and say whether the pruner stops it."""
    folder = Path(cfg.output_dir).resolve().parent
    number = int(Path(cfg.output_dir).name.rsplit("_", 1)[1])
    spec = read_spec(folder)
    study = open_study(folder, spec)
    import optuna

    trial = optuna.trial.Trial(study, _trial_id(study, number))

    def report(step: int, evaluation: int, metrics: dict) -> bool:
        value = metrics.get(spec.metric)
        if value is None:
            raise UserError(f"the search's objective {spec.metric} is not among the eval metrics "
                            f"({', '.join(sorted(metrics))})")
        with warnings.catch_warnings():  # a resumed run reports its evaluations again: ignored
            warnings.simplefilter("ignore")
            trial.report(float(value), evaluation)
        return trial.should_prune()

    return report


# ------------------------------------------------------------------ the report
def best_command(study, spec: SearchSpec, folder: Path) -> Optional[str]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = study.best_trial
    args = [*study.user_attrs.get("train_args", []), *point_flags(best.params),
            "--output_dir", str(folder / "best")]
    return "accelerate launch train.py " + shlex.join(args)


def importances(study) -> dict:
    """Optuna's parameter importances (its default evaluator, PED-ANOVA), from 3 complete trials on."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return {}
    try:
        with warnings.catch_warnings():  # "quantiles select the same trials": few trials, equal shares
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):
        return {}


def trial_rows(folder: Path, study, spec: SearchSpec) -> tuple[list[str], list[list]]:
    """Trials, best first: number, the values of the searched flags, objective, state, steps, wall time."""
    params = list(spec.space)
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = trial_dir(folder, t.number)
        run = load_run(run_dir) if is_run_dir(run_dir) else None
        steps = t.user_attrs.get("steps") or (run.steps() if run else None)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if t.value is not None else last
        rows.append([t.number, *[t.params.get(k) for k in params], value, t.state.name.lower(), steps,
                     fmt_duration(run.elapsed() if run else None)])
    sign = -1.0 if spec.direction == "maximize" else 1.0
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 2, "fail": 3}
    n = len(params) + 1
    rows.sort(key=lambda r: (order.get(r[n + 1], 3),
                             sign * r[n] if isinstance(r[n], float) and math.isfinite(r[n]) else math.inf, r[0]))
    for r in rows:
        r[n + 1] = {"fail": "failed"}.get(r[n + 1], r[n + 1])
    return ["trial", *params, spec.metric, "state", "steps", "wall_time"], rows


def plot_objective(study, spec: SearchSpec, path: Path) -> Optional[Path]:
    """Objective per trial with the best-so-far line (Optuna's optimization history, complete
    trials), and each pruned trial's last reported value as a grey cross."""
    plots.pyplot()  # the Agg backend, before Optuna's plotting imports pyplot
    import optuna.visualization.matplotlib as ovm

    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None
    ax = ovm.plot_optimization_history(study, target_name=spec.metric)
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in study.get_trials(deepcopy=False)
              if t.state.name == "PRUNED" and t.intermediate_values]
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last evaluation)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title(f"{spec.name}: {spec.metric} per trial ({spec.direction})")
    fig = ax.figure
    fig.set_size_inches(8, 4.8)
    fig.tight_layout()
    return plots.save(fig, path)


def report(folder: str | os.PathLike, write: bool = True) -> str:
    """The search's report (table of trials, best command line, importances) as markdown; with
    ``write``, also saved to SEARCH_FOLDER/report.md with the plot SEARCH_FOLDER/objective.png."""
    from fine_tune.core.tables import format_table

    folder = Path(folder).resolve()
    spec = read_spec(folder)
    study = open_study(folder, spec)
    columns, rows = trial_rows(folder, study, spec)
    states = [r[-3] for r in rows]
    lines = [f"search {spec.name}: {len(rows)} of {spec.trials} trials ("
             + ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "failed", "running")
                         if states.count(s)) + f"), objective {spec.metric} ({spec.direction})", "",
             format_table(columns, rows, "markdown").rstrip()]
    command = best_command(study, spec, folder)
    if command:
        best = study.best_trial
        lines += ["", f"best trial {best.number}: {spec.metric} {best.value:.4f}; train it again with:", "",
                  f"    {command}"]
    scores = importances(study)
    if scores:
        lines += ["", "parameter importances (Optuna): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())]
    if write:
        plot = plot_objective(study, spec, folder / PLOT_FILE)
        if plot:
            lines += ["", f"plot: {plot}"]
        (folder / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the submitter
def run_search(sub) -> int:
    """Create (or continue) the study, run the missing trials as one job array (locally: at most
    --array_parallelism at once, from here), follow them with --wait, print the report.
    Exit status: 0 when the study has all its trials, 75 when a trial stopped after
    --max_requeues, 1 otherwise."""
    o, spec, folder, base = sub.opts, sub.search, sub.output_dir, sub.specs[0]
    if o.dry_run:
        example = shlex.join(trial_args(base.train_args, folder, 0, {}, spec.name))
        sys.stdout.write(f"# dry run: nothing submitted (search {spec.name}: up to {spec.trials} trials as one job "
                         f"array, cluster {o.cluster})\n# ---- sbatch script\n{sbatch_text(sub).rstrip()}\n"
                         f"# ---- each trial (here trial 0, plus its values): train.py {example}\n")
        return 0
    create_study(folder, spec, base.train_args)
    counts = study_counts(folder)
    todo = spec.trials - counts["finished"] - counts["live"]
    parallel = max(1, o.array_parallelism or todo or 1)
    new = max(todo - counts["orphaned"], 0)
    print(f"search {spec.name}: {spec.trials} trials ({counts['finished']} finished, {counts['live']} running, "
          f"{counts['orphaned']} to resume, {new} to start), objective {spec.metric} ({spec.direction})", flush=True)
    print(f"output directory: {folder}", flush=True)
    watch = JobWatch(o.cluster)
    statuses: list[int] = []
    if todo > 0:
        ex = make_executor(sub)
        if o.cluster == "slurm":
            with ex.batch():
                jobs = [ex.submit(SearchJob(base)) for _ in range(todo)]
            print(f"submitted job array {str(jobs[0].job_id).split('_')[0]}: {todo} trial(s), at most "
                  f"{o.array_parallelism or todo} at once (slurm)", flush=True)
            for job in jobs:
                watch.add(job, f"job {job.job_id}", f"[{job.job_id}] ")
            print(f"follow: tail -f {job_log(jobs[0])}    report: fine-tune compare {folder}", flush=True)
            if not o.wait:
                return 0
        submitted = len(watch.jobs)
        while submitted < todo or watch.pending:
            while o.cluster == "local" and submitted < todo and len(watch.pending) < parallel:
                job = ex.submit(SearchJob(base))
                watch.add(job, f"job {job.job_id}", f"[task {submitted}] ")
                print(f"{PREFIX} started local job {job.job_id} (task {submitted} of {todo}), log {job_log(job)}",
                      flush=True)
                submitted += 1
            time.sleep(1.0)
            statuses += [status for _, status, _ in watch.poll()]
    text = report(folder)
    print(f"{PREFIX} search report ({folder / REPORT_FILE})", flush=True)
    print(text, end="", flush=True)
    if study_counts(folder)["finished"] >= spec.trials:
        return 0
    return EXIT_CHECKPOINTED if EXIT_CHECKPOINTED in statuses else 1
