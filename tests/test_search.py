"""Hyper-parameter search (`slurm/submit.py --search`): real Optuna studies whose trials are real
train.py runs, through submitit's local executor (the same code path as on Slurm) and on the
real Slurm of tests/test_slurm.py.

The tiny model learns little in a dozen steps, so the objective here is the eval loss
(minimized); learning rates above about 1 make it jump far above chance (ln 3 = 1.0986),
which the median pruner stops at the first evaluation once one trial has completed. The
random sampler with seed 5 draws the learning rates 0.0077, 3.73, 0.0020, 3.12, 0.0011, 1.22
for trials 0-5 (each trial's sampler is seeded with seed + trial number).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, ROOT, make_rows, read_metrics, run_train, train_args, write_jsonl

SUBMIT = ROOT / "slurm" / "submit.py"
TIMEOUT = 900


def search_file(path: Path, trials: int, warmup_evals: int = 0) -> Path:
    path.write_text(f"""\
search:
  learning_rate: {{log_uniform: [1.0e-3, 10.0]}}
objective: {{metric: eval_loss, direction: minimize}}
trials: {trials}
sampler: {{name: random, seed: 5}}
pruner: {{name: median, warmup_evals: {warmup_evals}, startup_trials: 1}}
""")
    return path


@pytest.fixture
def files(tmp_path) -> dict:
    return {"train": write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1, max_words=20)),
            "validation": write_jsonl(tmp_path / "validation.jsonl", make_rows(24, seed=2, max_words=20))}


def trial_flags(model, files, out, **kw) -> list[str]:
    opts = dict(max_steps=12, per_device_train_batch_size=4, max_length=32, eval_strategy="steps", eval_steps=3,
                logging_steps=3)
    opts.update(kw)
    args = train_args(model, files, out, **opts)
    i = args.index("--learning_rate")  # the search sets it
    return args[:i] + args[i + 2:]


def study(folder: Path):
    from fine_tune.launchers.search import open_study

    return open_study(folder)


def submit(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("text, expect", [
    ("search:\n  learning_rat: {choice: [1.0e-3]}\n", "unknown option --learning_rat; did you mean --learning_rate?"),
    ("search:\n  learning_rate: {uniform: [1.0e-3]}\n", "learning_rate: uniform needs [low, high] with low < high"),
    ("search:\n  learning_rate: {log_uniform: [0, 1]}\n", "log_uniform bounds must be > 0"),
    ("search:\n  lr_scheduler_type: {choice: [linear, cosin]}\n", "--lr_scheduler_type 'cosin' is not allowed"),
    ("search:\n  learning_rate: {uniform: [0.1, 0.2]}\nsampler: {name: grid}\n", "the grid sampler needs choice"),
    ("search:\n  learning_rate: {choice: [1.0e-3]}\ntrials: 0\n", "trials must be a positive integer"),
    ("search:\n  learning_rate: {choice: [1.0e-3]}\npruner: {name: hyperband}\n", "pruner must be"),
])
def test_bad_search_files_fail_in_one_line_before_anything_is_written(tmp_path, text, expect):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    out = tmp_path / "study"
    proc = submit(["--cluster", "local", "--search", str(spec), "--", "--output_dir", str(out)])
    assert proc.returncode == 2 and expect in proc.stderr, explain(proc)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and not out.exists()


def test_search_dry_run_is_one_array_of_all_trials(tmp_path):
    proc = submit(["--search", str(ROOT / "slurm" / "searches" / "sentiment.yaml"), "--array_parallelism", "4",
                   "--dry_run", "--", "--config", "recipes/sentiment.yaml", "--output_dir", str(tmp_path / "s")])
    assert proc.returncode == 0, explain(proc)
    assert "#SBATCH --array=0-19%4" in proc.stdout and "--eval_hook fine_tune.launchers.search:trial_reporter" \
        in proc.stdout and not (tmp_path / "s").exists()


def test_local_study_prunes_diverging_trials_and_its_best_command_reproduces_its_metric(tiny_model, files,
                                                                                          tmp_path):
    out = tmp_path / "study"
    started = time.monotonic()
    proc = submit(["--cluster", "local", "--search", str(search_file(tmp_path / "s.yaml", trials=6)),
                   "--array_parallelism", "2", "--time", "10", "--wait", "--",
                   *trial_flags(tiny_model, files, out)])
    print(f"6-trial local study: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, explain(proc)
    trials = study(out).get_trials()
    assert [t.number for t in trials] == list(range(6))
    states = {t.number: t.state.name for t in trials}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and list(states.values()).count("PRUNED") >= 1, states
    for t in trials:
        run = out / f"trial_{t.number}"
        results = json.loads((run / "eval_results.json").read_text())
        assert (run / "config.yaml").exists() and read_metrics(run)
        if t.state.name == "PRUNED":  # stopped at its evaluation: metrics and config, no final model
            assert t.params["learning_rate"] > 0.5, (t.number, t.params)
            assert results["status"] == "pruned" and not (run / "final").exists()
            assert results["global_step"] < 12 and results["global_step"] % 3 == 0
            assert max(r["step"] for r in read_metrics(run)) == results["global_step"]
        else:
            assert (run / "final" / "model.safetensors").exists() and results["global_step"] == 12
            assert t.value == pytest.approx(results["eval_loss"])
    # the report: table, best command line, plot
    report = (out / "report.md").read_text()
    assert report in proc.stdout and (out / "objective.png").stat().st_size > 10_000
    rows = [line for line in report.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    assert len(rows) == 6 and "pruned" in report and "complete" in report
    best = study(out).best_trial
    assert re.match(rf"\|\s+{best.number} \|", rows[0])  # best first
    command = next(line.strip() for line in report.splitlines() if line.strip().startswith("accelerate launch"))
    assert f"--learning_rate {best.params['learning_rate']!r}" in command
    args = shlex.split(command)[3:]
    run_train(args)  # one process, as every trial here
    again = json.loads((out / "best" / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(best.value, abs=1e-6)
    # `compare SEARCH_FOLDER` gives the same report at any time
    compare = subprocess.run([sys.executable, "-m", "fine_tune", "compare", str(out)], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0 and compare.stdout.splitlines()[:10] == report.splitlines()[:10], compare.stderr


def test_killed_submitter_reruns_to_exactly_the_asked_trials_and_two_process_pruning_stops_every_rank_together(
        tiny_model, files, tmp_path):
    """3 trials of 2 processes each (two local 'nodes'), one at a time; the submitter and every job
    it started are killed (SIGKILL to the process group) while trial 2 trains, after its first
    checkpoint (step 2; nothing is pruned before the second evaluation, step 8); the same command,
    run again, takes trial 2 over (same number, resumed from its checkpoint) and ends with exactly
    3 trials. Trial 1 (learning rate 3.7) is pruned on both ranks at the same step."""
    out = tmp_path / "study"
    args = ["--cluster", "local", "--nodes", "2", "--search",
            str(search_file(tmp_path / "s.yaml", trials=3, warmup_evals=1)), "--array_parallelism", "1",
            "--time", "10", "--wait", "--",
            *trial_flags(tiny_model, files, out, eval_steps=4, save_strategy="steps", save_steps=2)]
    started = time.monotonic()
    first = subprocess.Popen([sys.executable, str(SUBMIT), *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "trial_2" / "checkpoints" / "latest").exists():
            assert first.poll() is None, first.stdout.read()[-6000:]
            assert time.monotonic() < deadline, "trial 2 made no checkpoint in time"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the submitter, its local jobs and their training processes
        first.wait()
    assert not (out / "trial_2" / "eval_results.json").exists()
    proc = submit(args)
    print(f"3-trial 2-process local study with a kill: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, explain(proc)
    assert "1 to resume, 0 to start" in proc.stdout and "trial 2: its job" in proc.stdout
    assert re.search(r"resumed from .*trial_2/checkpoints/step_\d+", proc.stdout)
    trials = study(out).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "PRUNED"] and trials[2].state.is_finished()
    assert sorted(p.name for p in out.glob("trial_*")) == ["trial_0", "trial_1", "trial_2"]
    # trial 1, pruned: both ranks (one per local node, each with its own log) stopped at the same step
    logs = [p.read_text() for p in (out / "slurm_logs").glob("*/*_log.out")]
    stops = sorted(m.groups() for text in logs for m in re.finditer(r"pruned at step (\d+) .*\(process (\d) of 2\)",
                                                                    text))
    results = json.loads((out / "trial_1" / "eval_results.json").read_text())
    assert stops == [(str(results["global_step"]), "0"), (str(results["global_step"]), "1")], stops
    assert results["status"] == "pruned" and results["global_step"] == 8 and not (out / "trial_1" / "final").exists()


# ------------------------------------------------------------------ on the real Slurm of test_slurm.py
from test_slurm import slurm  # noqa: E402,F401 - the session fixture that starts slurm/dev_cluster.sh


def test_slurm_study_as_one_array_survives_a_preempted_trial(slurm, tiny_model, files, tmp_path):  # noqa: F811
    """4 trials (a grid of 4 learning rates, no pruning) as one job array, 2 at a time; the first
    trial to log steps is preempted with `scancel --signal=USR2 ARRAY_TASK`: it checkpoints, is
    requeued, resumes under the same trial number and ends complete with the eval loss of the same
    flags trained without a stop."""
    spec = tmp_path / "grid.yaml"
    spec.write_text("search:\n  learning_rate: {choice: [1.0e-3, 2.0e-3, 3.0e-3, 5.0e-3]}\n"
                    "objective: {metric: eval_loss, direction: minimize}\ntrials: 4\n"
                    "sampler: {name: grid, seed: 0}\npruner: none\n")
    out = tmp_path / "study"
    env = {**slurm}
    log = tmp_path / "submit.txt"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(SUBMIT), "--search", str(spec), "--array_parallelism", "2",
                             "--time", "10", "--max_requeues", "2", "--wait", "--",
                             *trial_flags(tiny_model, files, out, max_steps=80, eval_steps=40, logging_steps=5,
                                          save_strategy="no")],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    preempted = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while preempted is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            for run in sorted(out.glob("trial_*")):
                steps = [r["step"] for r in read_metrics(run)] if (run / "metrics.jsonl").exists() else []
                if steps and max(steps) < 60:
                    number = int(run.name.split("_")[1])
                    task = study(out).get_trials()[number].user_attrs["job"]
                    # (scancel may exit non-zero for an array task although every step got the signal;
                    # the requeue is checked in the logs below)
                    subprocess.run(["scancel", "--signal=USR2", task], env=env, capture_output=True)
                    preempted = number
                    break
            time.sleep(0.2)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            found = re.search(r"submitted job array (\d+)", log.read_text())
            if found:
                subprocess.run(["scancel", found.group(1)], env=env, capture_output=True)
    print(f"4-trial Slurm study with a preemption: {time.monotonic() - started:.0f} s")
    text = log.read_text()
    assert proc.returncode == 0, text[-8000:]
    assert re.search(r"submitted job array \d+: 4 trial\(s\), at most 2 at once", text)
    trials = study(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.params["learning_rate"] for t in trials) == [1e-3, 2e-3, 3e-3, 5e-3]
    run = out / f"trial_{preempted}"
    head = "\n".join(p.read_text() for p in (out / "slurm_logs").glob("*/*_log.out")
                     if f"trial {preempted}:" in p.read_text())
    assert "requeueing (requeue 1 of at most 2)" in head and "SLURM_RESTART_COUNT=1" in head, head[-5000:]
    assert re.search(rf"resumed from .*trial_{preempted}/checkpoints/step_\d+", head)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(5, 81, 5))  # none twice
    # the same flags without a stop reach the same eval loss
    reference = tmp_path / "reference"
    args = train_args(tiny_model, files, reference, max_steps=80, per_device_train_batch_size=4, max_length=32,
                      eval_strategy="steps", eval_steps=40, logging_steps=5, save_strategy="no",
                      learning_rate=trials[preempted].params["learning_rate"])
    run_train(args)
    expected = json.loads((reference / "eval_results.json").read_text())["eval_loss"]
    assert trials[preempted].value == pytest.approx(expected, abs=1e-6)
