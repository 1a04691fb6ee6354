"""Slurm jobs through `slurm/submit.py`, submitted as a user would, on a real Slurm.

A session fixture starts a real Slurm on this machine with `slurm/dev_cluster.sh start`
(Debian's munge/slurmctld/slurmd, two emulated nodes node1 and node2 on localhost) and
stops it at the end; where Slurm cannot be installed or started, those tests skip and say
why, and the `--cluster local` and dry-run tests still run.

Covered: a 2-node CPU DDP job and a 2-node DeepSpeed ZeRO-2 job (one process per node,
gloo); a 3-point sweep as one job array with its comparison table; preemption by
`scancel --signal=USR2` and a job that reaches its `--time`, each checkpointed, requeued
(SLURM_RESTART_COUNT=1 in the second run), resumed, and ending with the same weights as an
uninterrupted job; the dry run of a 4-node 8-GPU DeepSpeed job against golden text.

Timing trick: the time-limit warning comes from slurmctld's periodic check (every 30 s, and
up to 30 s early), so the job's first run must still be training up to 70 s after it starts. Rather than
burn a core that long, the test stops the training process (SIGSTOP) once it has logged
its first steps and lets it go on (SIGCONT) as soon as the job says it got the signal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, ROOT, load_weights, make_rows, read_metrics, relative_difference, train_args, write_jsonl

SUBMIT = ROOT / "slurm" / "submit.py"
DEV_CLUSTER = ROOT / "slurm" / "dev_cluster.sh"
JOB_TIMEOUT = 300


# ------------------------------------------------------------------ helpers
def submit(args: list[str], env: dict, timeout: int = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def submit_in_background(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUBMIT), *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def job_id(text: str) -> str:
    found = re.search(r"submitted job (\d+)", text)
    assert found, f"no job id in:\n{text}"
    return found.group(1)


def head_log(out: Path) -> str:
    logs = sorted((out / "slurm_logs").glob("*/*_0_log.out"))
    assert logs, f"no head-node log under {out / 'slurm_logs'}"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip().endswith("}")]


def timed_out_log(out: Path) -> str:
    return head_log(out) if list((out / "slurm_logs").glob("*/*_0_log.out")) else ""


def trainer_processes(out: Path) -> list:
    """The training processes (not the launchers) of the run writing to `out`."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(c.endswith("train.py") for c in cmd) and str(out) in cmd and not any("accelerate" in c for c in cmd):
            found.append(p)
    return found


@pytest.fixture
def tiny_files(tmp_path) -> dict:
    return {"train": write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1, max_words=20)),
            "validation": write_jsonl(tmp_path / "validation.jsonl", make_rows(12, seed=2, max_words=20))}


def flags(tiny_model, files, out, **kw) -> list[str]:
    opts = dict(max_steps=6, logging_steps=3, per_device_train_batch_size=4, max_length=32)
    opts.update(kw)
    return train_args(tiny_model, files, out, **opts)


# ------------------------------------------------------------------ the cluster
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment for Slurm commands, with a running dev cluster (started here, stopped after)."""
    state = os.environ.get("SLURM_DEV_DIR", "/tmp/fine_tune-slurm")
    env = {**ENV, "SLURM_DEV_DIR": state, "SLURM_CONF": f"{state}/slurm.conf"}
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        pytest.skip("Slurm tests skipped: Slurm is not installed and installing it (apt-get) needs root")
    already = subprocess.run(["bash", str(DEV_CLUSTER), "status"], env=env, capture_output=True, text=True)
    started = subprocess.run(["bash", str(DEV_CLUSTER), "start"], env=env, capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        tail = "\n".join((started.stdout + started.stderr).strip().splitlines()[-8:])
        pytest.skip(f"Slurm tests skipped: Slurm could not be installed or started by slurm/dev_cluster.sh "
                    f"start:\n{tail}")
    yield env
    if already.returncode != 0:  # leave a cluster that was running before the tests alone
        subprocess.run(["bash", str(DEV_CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


# ------------------------------------------------------------------ without Slurm
GOLDEN_DRY_RUN = """\
# dry run: nothing submitted (one job, 4 node(s) x 8 process(es), cluster slurm)
# submitit folder: <tmp>/big/slurm_logs/dry_run

# ---- sbatch script
#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --cpus-per-task=32
#SBATCH --gpus-per-node=8
#SBATCH --job-name=big-ds
#SBATCH --mem=400GB
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<tmp>/big/slurm_logs/dry_run/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=240
#SBATCH --wckey=submitit

# setup
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <tmp>/big/slurm_logs/dry_run/%j_%t_log.out --kill-on-bad-exit=1 <bin>/python -u -m \
submitit.core._submit <tmp>/big/slurm_logs/dry_run

# ---- per-node commands (each node's task builds its own; $HEAD_NODE = the job's first host,
#      $PORT = 15000 + job id % 10000)
""" + "".join(
    f"node {r}: <bin>/accelerate launch --config_file <repo>/accelerate_configs/multi_node_deepspeed.yaml "
    f"--num_machines 4 --machine_rank {r} --main_process_ip $HEAD_NODE --main_process_port $PORT --num_processes 32 "
    "--rdzv_backend static --same_network --deepspeed_multinode_launcher standard --deepspeed_config_file "
    "<repo>/accelerate_configs/ds_zero2.json <repo>/train.py --config recipes/sentiment.yaml --mixed_precision bf16 "
    "--output_dir <tmp>/big --resume_from_checkpoint latest --expected_world_size 32\n" for r in range(4))


def test_dry_run_of_a_4_node_8_gpu_deepspeed_job_matches_the_golden_text(tmp_path):
    proc = submit(["--nodes", "4", "--gpus_per_node", "8", "--cpus_per_task", "32", "--mem_gb", "400",
                   "--time", "240", "--partition", "gpu", "--account", "proj", "--job_name", "big-ds",
                   "--accelerate_config", "accelerate_configs/multi_node_deepspeed.yaml",
                   "--setup", "module load cuda/12.4", "--dry_run", "--",
                   "--config", "recipes/sentiment.yaml", "--output_dir", str(tmp_path / "big"),
                   "--mixed_precision", "bf16"], ENV, timeout=120)
    assert proc.returncode == 0, explain(proc)
    text = proc.stdout.replace(str(Path(sys.executable).parent), "<bin>").replace(str(ROOT), "<repo>") \
        .replace(str(tmp_path), "<tmp>")
    assert text == GOLDEN_DRY_RUN.replace(" \\\n", " ")
    assert not (tmp_path / "big").exists()  # nothing created, nothing submitted


def test_sweep_files_expand_into_named_points(tmp_path):
    from fine_tune.launchers.sweeps import expand_sweep, point_name

    name, points, fixed = expand_sweep(ROOT / "slurm" / "sweeps" / "lr_scheduler.yaml")
    assert name == "lr_scheduler" and len(points) == 6 and fixed == {"warmup_ratio": 0.06}
    assert {p["lr_scheduler_type"] for p in points} == {"linear", "cosine"}
    assert len({point_name(p) for p in points}) == 6
    assert point_name({"learning_rate": 3e-5, "lr_scheduler_type": "cosine"}) == \
        "learning_rate=3e-05,lr_scheduler_type=cosine"
    sampled = tmp_path / "random.yaml"
    sampled.write_text("random: 5\nseed: 1\ngrid:\n  learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}\n"
                       "  per_device_train_batch_size: [8, 16]\nfixed:\n  warmup_ratio: 0.1\n")
    _, first, fixed = expand_sweep(sampled)
    _, again, _ = expand_sweep(sampled)
    assert first == again and len(first) == 5 and fixed == {"warmup_ratio": 0.1}
    assert all(1e-5 <= p["learning_rate"] <= 1e-3 and p["per_device_train_batch_size"] in (8, 16) for p in first)


def test_bad_train_flags_and_sweeps_fail_before_anything_is_submitted(tmp_path):
    proc = submit(["--cluster", "local", "--", "--learning_rat", "1e-3", "--output_dir", str(tmp_path / "x")],
                  ENV, timeout=120)
    assert proc.returncode == 2 and "--learning_rate" in proc.stderr, explain(proc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  lr_schedule: [linear]\n")
    proc = submit(["--cluster", "local", "--sweep", str(bad), "--", "--output_dir", str(tmp_path / "s")],
                  ENV, timeout=120)
    assert proc.returncode == 2 and "lr_scheduler_type" in proc.stderr, explain(proc)
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


def test_a_task_that_sees_fewer_nodes_than_asked_fails_clearly(tmp_path, monkeypatch):
    import submitit

    from fine_tune.launchers.job import JobSetupError, JobSpec, TrainJob

    class OneNode:
        job_id = raw_job_id = "42"
        num_tasks = num_nodes = 1
        node = global_rank = 0
        hostnames = ["node1"]

    monkeypatch.setattr(submitit, "JobEnvironment", OneNode)
    job = TrainJob(JobSpec(train_args=[], output_dir=str(tmp_path), accelerate_config="x.yaml", nodes=2))
    with pytest.raises(JobSetupError, match="asked for 2 node"):
        job()


def test_local_cluster_runs_two_nodes_on_this_machine(tiny_model, tiny_files, tmp_path):
    out = tmp_path / "local"
    proc = submit(["--cluster", "local", "--nodes", "2", "--time", "10", "--wait", "--",
                   *flags(tiny_model, tiny_files, out)], ENV)
    assert proc.returncode == 0, explain(proc)
    assert "submitted job" in proc.stdout and str(out) in proc.stdout
    assert "(2 process(es) x" in proc.stdout and "--machine_rank 0" in proc.stdout
    assert (out / "final" / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [3, 6]


# ------------------------------------------------------------------ on Slurm
def test_two_node_cpu_ddp_job(slurm, tiny_model, tiny_files, tmp_path):
    out = tmp_path / "ddp"
    proc = submit(["--nodes", "2", "--time", "10", "--wait", "--", *flags(tiny_model, tiny_files, out)], slurm)
    assert proc.returncode == 0, explain(proc)
    assert "(2 process(es) x 4 x 1 accumulation)" in proc.stdout  # both nodes train together
    assert "node 0 of 2 (node1)" in proc.stdout
    node1 = next((out / "slurm_logs").glob("*/*_1_log.out")).read_text()
    assert "node 1 of 2 (node2)" in node1 and "--machine_rank 1" in node1 and "--main_process_ip node1" in node1
    assert (out / "final" / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [3, 6]


def test_two_node_deepspeed_zero2_job_on_cpu(slurm, tiny_model, tiny_files, tmp_path):
    out = tmp_path / "zero2"
    proc = submit(["--nodes", "2", "--time", "10", "--accelerate_config",
                   "accelerate_configs/multi_node_deepspeed.yaml", "--wait", "--",
                   *flags(tiny_model, tiny_files, out, save_strategy="steps", save_steps=6)], slurm)
    assert proc.returncode == 0, explain(proc)
    assert "DeepSpeed ZeRO-2 over 2 processes" in proc.stdout and "(2 process(es) x" in proc.stdout
    assert "--deepspeed_multinode_launcher standard" in proc.stdout
    shards = sorted(p.name for p in (out / "checkpoints" / "step_6").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO: the optimizer state is split between the two nodes' ranks
    assert (out / "final" / "model.safetensors").exists() and (out / "eval_results.json").exists()


def test_sweep_runs_as_one_job_array_and_ends_with_a_comparison(slurm, tiny_model, tiny_files, tmp_path):
    sweep = tmp_path / "three.yaml"
    sweep.write_text("grid:\n  learning_rate: [1.0e-3, 2.0e-3, 5.0e-3]\n  lr_scheduler_type: [linear]\n")
    out = tmp_path / "sweep"
    proc = submit(["--sweep", str(sweep), "--array_parallelism", "3", "--time", "10", "--wait", "--",
                   *flags(tiny_model, tiny_files, out, eval_strategy="epoch")], slurm)
    assert proc.returncode == 0, explain(proc)
    array = re.search(r"submitted job array (\d+)", proc.stdout)
    assert array, proc.stdout
    names = [f"learning_rate={lr},lr_scheduler_type=linear" for lr in ("0.001", "0.002", "0.005")]
    for i, name in enumerate(names):
        assert f"job {array.group(1)}_{i}: {name}" in proc.stdout
        results = json.loads((out / name / "eval_results.json").read_text())
        assert results["global_step"] == 6
        config = (out / name / "config.yaml").read_text()
        assert "wandb_group: three" in config and f"run_name: {name}" in config
    assert sorted(p.name for p in out.iterdir() if p.name != "slurm_logs") == sorted(names)
    table = proc.stdout.split("comparison of 3 runs", 1)
    assert len(table) == 2, proc.stdout
    assert proc.stdout.count("comparison of 3 runs") == 1
    for name in names:
        assert name in table[1]


def test_preemption_and_time_limit_requeue_and_resume_to_the_same_weights(slurm, tiny_model, tiny_files, tmp_path):
    """Three 2-node jobs at once: an uninterrupted one, one preempted by `scancel --signal=USR2`, one
    that reaches its time limit (--time 2, the warning 50 s before it: slurmctld sends it at its
    first 30-second check past 120 - 50 - 30 = 40 s, so between 40 and 70 s into the run, and the
    requeued run, shorter than 40 s, finishes without one)."""
    common = dict(max_steps=120, logging_steps=10, per_device_train_batch_size=4, save_strategy="no")
    outs = {k: tmp_path / k for k in ("reference", "preempted", "timed_out")}
    env = {**slurm, "WANDB_MODE": "offline"}
    procs = {
        "reference": submit_in_background(["--nodes", "2", "--time", "10", "--wait", "--",
                                           *flags(tiny_model, tiny_files, outs["reference"], **common)],
                                          env, tmp_path / "reference.txt"),
        "preempted": submit_in_background(["--nodes", "2", "--time", "10", "--max_requeues", "3", "--wait", "--",
                                           *flags(tiny_model, tiny_files, outs["preempted"], report_to="wandb",
                                                  **common)], env, tmp_path / "preempted.txt"),
        "timed_out": submit_in_background(["--nodes", "2", "--time", "2", "--signal_delay_s", "50",
                                           "--max_requeues", "3", "--wait", "--",
                                           *flags(tiny_model, tiny_files, outs["timed_out"], **common)],
                                          env, tmp_path / "timed_out.txt"),
    }
    try:
        check_preemption(procs, outs, env, tmp_path, tiny_model)
    finally:  # a failed test leaves no job or follower behind
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                text = (tmp_path / f"{name}.txt").read_text()
                if re.search(r"submitted job (\d+)", text):
                    subprocess.run(["scancel", job_id(text)], env=env, capture_output=True)


def check_preemption(procs, outs, env, tmp_path, tiny_model):
    stopped, preempted = [], False
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (preempted and (stopped or "got SIGUSR2" in timed_out_log(outs["timed_out"]))):
            assert time.monotonic() < deadline, "the jobs did not start training in time"
            # preemption: USR2 to the job's steps once the run has logged its first steps
            if not preempted and logged_steps(outs["preempted"]):
                preempted_id = job_id((tmp_path / "preempted.txt").read_text())
                subprocess.run(["scancel", "--signal=USR2", preempted_id], env=env, check=True)
                preempted = True
            # time limit: hold the training process still until Slurm's warning arrives
            if not stopped and logged_steps(outs["timed_out"]) \
                    and "got SIGUSR2" not in timed_out_log(outs["timed_out"]):
                for p in trainer_processes(outs["timed_out"]):
                    p.send_signal(signal.SIGSTOP)
                    stopped.append(p)
                assert stopped, "no training process found for the time-limit job"
            time.sleep(0.1)
        wait_until(lambda: "got SIGUSR2" in timed_out_log(outs["timed_out"]), 150, "the time-limit warning",
                   poll=0.5)
    finally:
        for p in stopped:
            try:
                p.send_signal(signal.SIGCONT)
            except Exception:  # noqa: BLE001 - already gone
                pass
    for name, proc in procs.items():
        proc.wait(timeout=JOB_TIMEOUT)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{(tmp_path / f'{name}.txt').read_text()[-6000:]}"

    ref = load_weights(outs["reference"] / "final")
    init = load_weights(tiny_model)
    for name in ("preempted", "timed_out"):
        log = head_log(outs[name])
        assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
        assert "stopped by a signal at step" in log and "requeueing (requeue 1 of at most 3)" in log
        assert re.search(r"resumed from .*checkpoints/step_\d+ at step \d+", log)
        node1 = "\n".join(p.read_text() for p in (outs[name] / "slurm_logs").glob("*/*_1_log.out"))
        assert "node 1 stopped after a checkpoint" in node1 and "SLURM_RESTART_COUNT=1" in node1
        final = load_weights(outs[name] / "final")
        assert relative_difference(final, ref, init) < 1e-6, name
        steps = [r["step"] for r in read_metrics(outs[name]) if "loss" in r]
        assert steps == list(range(10, 121, 10)), (name, steps)  # appended once each, none twice
    assert "SLURM_RESTART_COUNT=1" not in head_log(outs["reference"])
    # the resumed run continued the same W&B run
    runs = {p.name.split("-")[-1] for p in (outs["preempted"] / "wandb").glob("offline-run-*")}
    assert len(runs) == 1, runs
    assert len(list((outs["preempted"] / "wandb").glob("offline-run-*"))) == 2


def test_plain_sbatch_script_runs_every_node_and_requeues_after_usr2(slurm, tiny_model, tiny_files, tmp_path):
    out = tmp_path / "sbatch"
    env = {**slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm.get('PATH', '')}"}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "--time=10",
                           str(ROOT / "slurm" / "train.sbatch"),
                           *flags(tiny_model, tiny_files, out, max_steps=40, logging_steps=5, save_strategy="no")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, explain(proc)
    jid = proc.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: logged_steps(out), JOB_TIMEOUT, "the first steps")
        subprocess.run(["scancel", "--batch", "--signal=USR2", jid], env=env, check=True)
        wait_until(lambda: slurm_job_state(jid, env) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "?"),
                   JOB_TIMEOUT, "the end of the job", poll=1)
    finally:
        subprocess.run(["scancel", jid], env=env, capture_output=True)
    log = (tmp_path / f"slurm-{jid}.out").read_text(errors="replace")
    assert slurm_job_state(jid, env) == "COMPLETED", log[-5000:]
    assert "node 0 of 2 (node1)" in log and "node 1 of 2 (node2)" in log  # each node expanded its own rank
    assert "(2 process(es) x 4 x 1 accumulation)" in log
    assert "SLURM_RESTART_COUNT=1" in log and "requeueing job" in log
    assert re.search(r"resumed from .*checkpoints/step_\d+", log)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(5, 41, 5))
    assert (out / "final" / "model.safetensors").exists()


def slurm_job_state(jid: str, env: dict) -> str:
    proc = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True)
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else "?"
