"""A run that is interrupted and resumed ends with the same weights as one that never stopped.

Real processes and real signals: SIGKILL at a random step (one process, and a 2-process gloo
job), SIGUSR2 / SIGTERM to a 2-process job (each rank started as `python train.py` with the
torch.distributed environment, as srun starts them, so the exit status reaches us directly),
and a crash in the middle of a checkpoint write. Dropout is on, so the RNG streams must be
restored too.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import ENV, ROOT, free_port, launch_cmd, load_weights, read_metrics, run_train, small_files, \
    train_args
from fine_tune import EXIT_CHECKPOINTED

STEPS = 90  # 3 epochs of 30 steps (61 examples, batch 2): resumes land mid-epoch


def args_for(tiny_model, files, out, **kw):
    opts = dict(per_device_train_batch_size=2, max_steps=STEPS, save_strategy="steps", save_steps=4,
                save_total_limit=3, model_config_overrides='{"hidden_dropout_prob": 0.1}')
    opts.update(kw)
    return train_args(tiny_model, files, out, **opts)


def assert_same_run(out, ref):
    a, b = load_weights(out / "final"), load_weights(ref / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    mine = [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    theirs = [(r["step"], r["loss"]) for r in read_metrics(ref) if "loss" in r]
    assert mine == theirs  # every step logged once, with the same loss


def wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
            if lines and lines[-1]["step"] >= step and (out / "checkpoints" / "latest").exists():
                return
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step in time")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    files = small_files(tmp)
    ref1 = tmp / "ref_1proc"
    run_train(args_for(tiny_model, files, ref1))
    return {"files": files, "tmp": tmp, "one": ref1}


def test_sigkill_then_resume_is_bit_exact_one_process(uninterrupted, tiny_model):
    out = uninterrupted["tmp"] / "killed_1proc"
    args = args_for(tiny_model, uninterrupted["files"], out)
    proc = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(out, random.Random().randint(9, 60), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    resumed = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert f"resumed from {out / 'checkpoints' / latest}" in resumed.stdout
    assert_same_run(out, uninterrupted["one"])


def test_sigkill_then_resume_two_processes(uninterrupted, tiny_model):
    ref = uninterrupted["tmp"] / "ref_2proc"
    run_train(args_for(tiny_model, uninterrupted["files"], ref, per_device_train_batch_size=1), "cpu_ddp.yaml", 2)
    out = uninterrupted["tmp"] / "killed_2proc"
    args = args_for(tiny_model, uninterrupted["files"], out, per_device_train_batch_size=1)
    proc = subprocess.Popen(launch_cmd("cpu_ddp.yaml", 2) + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(out, random.Random().randint(9, 60), proc)
    # the launcher and both ranks at once (torchrun's workers live in their own process group)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in family[1:] if psutil.pid_exists(p)], timeout=30)
    run_train(args + ["--resume_from_checkpoint", "latest"], "cpu_ddp.yaml", 2)
    assert_same_run(out, ref)


def start_ranks(args, world=2):
    """One `python train.py` per rank with the torch.distributed variables, as srun would."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py")] + args, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def ranks_reference(uninterrupted, tiny_model):
    """The uninterrupted 2-rank run, started as the signalled runs are; shared by both signals."""
    ref = uninterrupted["tmp"] / "ref_ranks"
    procs = start_ranks(args_for(tiny_model, uninterrupted["files"], ref, per_device_train_batch_size=1,
                                 save_strategy="no"))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:]
    return ref


@pytest.mark.parametrize("sig,targets", [(signal.SIGUSR2, "rank 1 only"), (signal.SIGTERM, "both ranks")])
def test_signal_checkpoints_all_ranks_at_the_same_step(uninterrupted, ranks_reference, tiny_model, sig, targets):
    files = uninterrupted["files"]
    out = uninterrupted["tmp"] / f"signalled_{sig.name}"
    args = args_for(tiny_model, files, out, per_device_train_batch_size=1, save_strategy="no")
    procs = start_ranks(args)
    # no periodic checkpoints here: wait for training to be under way, then signal
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 10:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    for p in (procs[1:] if targets == "rank 1 only" else procs):
        p.send_signal(sig)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_CHECKPOINTED] * 2, logs[0][-2000:]
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    step = json.loads((ckpt / "train_state.json").read_text())["global_step"]
    assert 0 < step < STEPS
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert f"stopped by a signal at step {step}" in logs[0]
    procs = start_ranks(args + ["--resume_from_checkpoint", "latest"])
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:]
    assert_same_run(out, ranks_reference)


def test_single_process_signal_exit_status(uninterrupted, tiny_model):
    out = uninterrupted["tmp"] / "sigint"
    args = args_for(tiny_model, uninterrupted["files"], out, save_strategy="no", max_steps=100000)
    proc = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # one Ctrl-C: checkpoint and exit
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_CHECKPOINTED, log[-2000:]
    assert (out / "checkpoints" / "latest").exists()


def test_crash_during_checkpoint_write_keeps_previous_latest(uninterrupted, tiny_model):
    out = uninterrupted["tmp"] / "crash_in_save"
    args = args_for(tiny_model, uninterrupted["files"], out)
    env = {**ENV, "FINE_TUNE_TEST_CRASH_BEFORE_RENAME": "12"}  # fail while saving step 12
    proc = subprocess.run(launch_cmd(None) + args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_8"
    assert (ckpts / ".tmp-step_12").exists() and not (ckpts / "step_12").exists()
    run_train(args + ["--resume_from_checkpoint", "latest"])
    assert not (ckpts / ".tmp-step_12").exists()  # cleaned up by the next save
    assert_same_run(out, uninterrupted["one"])


def test_resume_refuses_a_different_batch_size(uninterrupted, tiny_model):
    out = uninterrupted["one"]
    args = args_for(tiny_model, uninterrupted["files"], out, per_device_train_batch_size=4)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = run_train(args + ["--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode == 2
    assert "per_device_train_batch_size: checkpoint 2, now 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_latest_without_checkpoint_starts_fresh(tiny_model, data_files, tmp_path):
    proc = run_train(train_args(tiny_model, data_files, tmp_path / "fresh", max_steps=2) +
                     ["--resume_from_checkpoint", "latest"])
    assert "no checkpoint in" in proc.stdout and "starting fresh" in proc.stdout
    assert (tmp_path / "fresh" / "final" / "model.safetensors").exists()


def test_nonfinite_gradient_skips_then_stops_without_saving_it(tiny_model, tmp_path):
    """A regression label of 1e30 makes the squared error overflow to inf: that step's update
    is skipped; past --max_nonfinite_steps the run stops, and no checkpoint holds bad weights."""
    from conftest import make_rows, write_jsonl

    rows = [{"text": r["text"], "score": float(i % 3)} for i, r in enumerate(make_rows(24, seed=4))]
    bad = [dict(r, score=1e30) if i == 5 else r for i, r in enumerate(rows)]
    files = {"train": write_jsonl(tmp_path / "bad.jsonl", bad), "validation": write_jsonl(tmp_path / "ok.jsonl", rows)}
    common = dict(task="regression", label_column="score", per_device_train_batch_size=4, max_steps=6,
                  save_strategy="steps", save_steps=1, group_by_length="false")
    # tolerated: the one bad step is skipped, the run finishes with finite weights
    out = tmp_path / "tolerated"
    proc = run_train(train_args(tiny_model, files, out, max_nonfinite_steps=1, **common))
    assert proc.stdout.count("non-finite gradient norm, update skipped") == 1
    weights = load_weights(out / "final")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # not tolerated (the default 0): the run stops at that step, and saved only good steps
    out = tmp_path / "stopped"
    proc = run_train(train_args(tiny_model, files, out, **common), check=False)
    assert proc.returncode == 2 and "consecutive optimizer steps with a non-finite" in proc.stderr
    assert not (out / "final").exists()
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved and all(torch.isfinite(load_weights(p)["classifier.weight"]).all() for p in saved)
    bad_step = int(proc.stdout.split(": non-finite gradient norm")[0].rsplit("step ", 1)[1])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{bad_step - 1}"
