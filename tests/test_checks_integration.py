"""Signals and failures of real processes: a signal during start-up or during an evaluation
is acted on, a SIGTERM to the launcher of a 2-process run ends in a checkpoint, and one
failing (or silent) process ends the whole run promptly, with its error shown. Plus the
checks that must fire before the output folder is touched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import ENV, ROOT, launch_cmd, make_rows, read_metrics, run_train, small_files, train_args, \
    write_jsonl
from fine_tune import EXIT_CHECKPOINTED
from faulty_train import DATA_FAULT_ENV, SCRIPT as FAULTY_TRAIN

STOP_LINE = "stop requested ({}): checkpointing after this step; Ctrl-C again aborts"


def sigterm_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_sigterm_during_start_up_checkpoints_instead_of_killing(tiny_model, data_files, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(None) + train_args(tiny_model, data_files, out, max_steps=6), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not sigterm_caught(proc.pid):
        assert time.time() < deadline and proc.poll() is None, "no SIGTERM handler was installed"
        time.sleep(0.002)
    before_torch = not torch_loaded(proc.pid)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert before_torch, "the stop handler was installed only after torch was imported"
    assert proc.returncode == EXIT_CHECKPOINTED, stderr[-3000:]
    assert stderr.count(STOP_LINE.format("SIGTERM")) == 1
    assert (out / "checkpoints" / "step_1" / "train_state.json").exists()
    assert "stopped by a signal at step 1" in stdout


def test_signal_during_evaluation_stops_it_and_resume_evaluates(tiny_model, tmp_path):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", make_rows(16, seed=1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", make_rows(4000, seed=2, max_words=60))}
    out = tmp_path / "run"
    args = train_args(tiny_model, files, out, max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                      eval_steps=2, per_device_eval_batch_size=1, max_length=128)
    proc = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not any(r["step"] == 2 for r in read_metrics(out)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(1.0)  # inside the evaluation of step 2 (4000 examples one by one: many seconds)
    signalled = time.time()
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_CHECKPOINTED, stderr[-3000:]
    assert "evaluation of step 2 interrupted" in stdout
    assert not any("eval_loss" in r for r in read_metrics(out)), "the evaluation ran to its end"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert time.time() - signalled < 60
    # the interrupted evaluation is done first on resume, then training goes on
    run_train(args + ["--resume_from_checkpoint", "latest"], timeout=900)
    evals = [r["step"] for r in read_metrics(out) if "eval_loss" in r]
    assert evals == [2, 4]


def test_sigterm_to_the_accelerate_launcher_checkpoints_both_processes(tiny_model, tmp_path):
    files = small_files(tmp_path)
    out, statuses = tmp_path / "run", tmp_path / "status"
    statuses.mkdir()
    args = train_args(tiny_model, files, out, max_steps=100000, per_device_train_batch_size=1)
    cmd = launch_cmd("cpu_ddp.yaml", 2)[:-1] + [str(ROOT / "tests" / "exit_status.py")] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "EXIT_STATUS_DIR": str(statuses)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # the launcher only: torchrun forwards it to the ranks
    log = proc.communicate(timeout=300)[0]
    psutil.wait_procs(ranks, timeout=30)
    assert {p.name: p.read_text() for p in statuses.iterdir()} == \
        {"rank_0": str(EXIT_CHECKPOINTED), "rank_1": str(EXIT_CHECKPOINTED)}, log[-3000:]
    assert "forcefully exiting" not in log  # both saved within torchrun's grace period
    assert log.count(STOP_LINE.format("SIGTERM")) == 2  # one line from each rank
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    step = json.loads((ckpt / "train_state.json").read_text())["global_step"]
    assert f"stopped by a signal at step {step}" in log
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()


def test_one_failing_process_ends_both_within_60_s_with_its_error(tiny_model, data_files, tmp_path):
    out = tmp_path / "run"
    # train.py with a fault staged while the data loads (tests/faulty_train.py)
    proc = subprocess.Popen(launch_cmd("cpu_ddp.yaml", 2)[:-1] + [str(FAULTY_TRAIN)] +
                            train_args(tiny_model, data_files, out, max_steps=4),
                            cwd=ROOT, env={**ENV, DATA_FAULT_ENV: "1:raise"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = proc.communicate(timeout=600)[0]  # returns once every process holding the pipe has ended
    ended = time.time()
    assert "simulated failure of process 1 at unix time " in log, log[-3000:]
    failed_at = float(log.split("simulated failure of process 1 at unix time ")[1].split()[0])
    assert ended - failed_at < 60
    assert proc.returncode != 0 and not (out / "final").exists()
    # rank 0 names rank 1 and its error; rank 1 shows its own traceback
    assert "error: process 1 failed while loading the data: OSError: " in log, log[-3000:]


def start_ranks(args: list[str], env: dict, world: int = 2,
                script: Path = ROOT / "train.py") -> list[subprocess.Popen]:
    """One `python train.py` per rank with the torch.distributed variables, as srun starts them."""
    from conftest import free_port

    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, text=True,
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                  "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for rank in range(world)]


def test_a_silent_process_ends_the_run_after_ddp_timeout(tiny_model, data_files, tmp_path):
    """No launcher watches ranks started directly: rank 0 stops answering while it loads the
    data (rank 1 waits for it at a barrier), and rank 1 gives up after --ddp_timeout, saying so."""
    procs = start_ranks(train_args(tiny_model, data_files, tmp_path / "run", max_steps=4, ddp_timeout=5),
                        {**ENV, DATA_FAULT_ENV: "0:hang"}, script=FAULTY_TRAIN)
    try:
        log = procs[1].communicate(timeout=240)[0]
        assert procs[1].returncode == 2, log[-3000:]
        assert "error: another process failed or did not answer while loading the data within --ddp_timeout 5 s" \
            in log, log[-3000:]
    finally:
        procs[0].kill()
        procs[0].communicate()


def test_unknown_metric_for_best_model_fails_before_the_folder_is_touched(tiny_model, data_files, tmp_path):
    out = tmp_path / "run"
    run_train(train_args(tiny_model, data_files, out, max_steps=1))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = run_train(train_args(tiny_model, data_files, out, max_steps=1, metric_for_best_model="f1",
                                overwrite_output_dir="true"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --metric_for_best_model 'f1'")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
