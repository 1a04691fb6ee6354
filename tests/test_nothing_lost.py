"""Nothing lost, nothing run: output folders that cannot be wiped by accident, one run per
folder, atomic results, checkpoints that run no code and are checked against their manifest,
and the best model kept at the end.

Real processes throughout (train.py subprocesses, real flock, real SIGKILL, a real file-size
limit standing in for a full disk); the only stand-in is the kill hook inside the final save
(FINE_TUNE_TEST_KILL_IN_FINAL_SAVE), which SIGKILLs the process at the one moment a timed
signal from outside could not hit reliably.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, LABELS, ROOT, load_weights, read_metrics, run_train, small_files, train_args


def files_of(folder: Path) -> dict:
    """Every file's bytes (but the lock file's, which names whoever ran last)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def error_line(proc) -> str:
    return "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error:"))


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """One data set, a run with checkpoints at steps 2, 4, 6, 8 (all kept) and a finished run."""
    tmp = tmp_path_factory.mktemp("nothing_lost")
    files = small_files(tmp)
    ckpt_run = tmp / "with_checkpoints"
    run_train(train_args(tiny_model, files, ckpt_run, max_steps=8, per_device_train_batch_size=4,
                         save_strategy="steps", save_steps=2, save_total_limit=4))
    finished = tmp / "finished"
    run_train(train_args(tiny_model, files, finished, max_steps=2, per_device_train_batch_size=4))
    return {"tmp": tmp, "files": files, "ckpt_run": ckpt_run, "finished": finished}


def copy_run(setup, name: str, source: str = "ckpt_run") -> Path:
    dest = setup["tmp"] / name
    shutil.copytree(setup[source], dest)
    return dest


# ------------------------------------------------------------------ 1. folders never wiped by accident
def test_latest_with_nothing_to_resume_refuses_to_replace_a_finished_run(setup, tiny_model):
    out = copy_run(setup, "finished_latest", "finished")
    before = files_of(out)
    args = train_args(tiny_model, setup["files"], out, max_steps=2, per_device_train_batch_size=4)
    proc = run_train(args + ["--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode == 2 and "holds a finished run" in error_line(proc), proc.stderr[-2000:]
    assert "--overwrite_output_dir" in error_line(proc) and "Traceback" not in proc.stderr
    assert files_of(out) == before  # final/, eval_results.json, metrics.jsonl untouched
    proc = run_train(args + ["--resume_from_checkpoint", "latest", "--overwrite_output_dir", "true"])
    assert "starting fresh" in proc.stdout


def test_resume_from_another_folders_checkpoint_refuses_an_occupied_output_dir(setup, tiny_model):
    out = copy_run(setup, "occupied", "finished")
    before = files_of(out)
    step_4 = setup["ckpt_run"] / "checkpoints" / "step_4"
    args = train_args(tiny_model, setup["files"], out, max_steps=6, per_device_train_batch_size=4)
    proc = run_train(args + ["--resume_from_checkpoint", str(step_4)], check=False)
    assert proc.returncode == 2 and "holds another run" in error_line(proc), proc.stderr[-2000:]
    assert files_of(out) == before
    # with --overwrite_output_dir the old run goes and the new one continues from step 4
    proc = run_train(args + ["--resume_from_checkpoint", str(step_4), "--overwrite_output_dir", "true"])
    assert "at step 4" in proc.stdout
    assert min(r["step"] for r in read_metrics(out)) == 5  # the other run's metrics are gone
    assert json.loads((out / "eval_results.json").read_text())["global_step"] == 6


def test_rotation_keeps_the_checkpoint_just_written_and_the_one_latest_names(tmp_path):
    from fine_tune.core.checkpoint import rotate

    root = tmp_path / "checkpoints"
    for step in (5, 6, 8):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "train_state.json").write_text("{}")
    (root / "latest").write_text("step_6\n")
    rotate(root, 1, {"step_5"})  # step_5 was just written; latest names step_6
    assert sorted(p.name for p in root.glob("step_*")) == ["step_5", "step_6", "step_8"]
    (root / "latest").write_text("step_8\n")
    rotate(root, 1, {"step_8"})
    assert sorted(p.name for p in root.glob("step_*")) == ["step_8"]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(setup, tiny_model):
    """Resume step_4 while step_6 and step_8 exist, saving every step with a limit of 2, and
    crash while saving step 7: the folder must tell one story, and `latest` must lead back to it."""
    out = copy_run(setup, "older")
    old_8 = load_weights(out / "checkpoints" / "step_8")
    args = train_args(tiny_model, setup["files"], out, max_steps=8, per_device_train_batch_size=4,
                      save_strategy="steps", save_steps=1, save_total_limit=2)
    env = {**ENV, "FINE_TUNE_TEST_CRASH_BEFORE_RENAME": "7"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume_from_checkpoint",
                           str(out / "checkpoints" / "step_4")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "moved to" in line]
    assert len(lines) == 1 and "step_6, step_8" in lines[0], proc.stdout[-2000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_5", "step_6"]
    assert (ckpts / "latest").read_text().strip() == "step_6"
    aside = next(ckpts.glob("abandoned-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_6", "step_8"]
    # the resume after the crash continues this story, not the abandoned step_8
    proc = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert f"resumed from {ckpts / 'step_6'} at step 6" in proc.stdout
    new_8 = load_weights(ckpts / "step_8")
    assert all((new_8[k] == old_8[k]).all() for k in new_8)  # the same maths: the same weights again


def test_one_run_per_folder_and_a_dead_holders_lock_is_taken_over(setup, tiny_model):
    out = setup["tmp"] / "locked"
    args = train_args(tiny_model, setup["files"], out, max_steps=100000, per_device_train_batch_size=4,
                      save_strategy="steps", save_steps=3) + ["--resume_from_checkpoint", "latest"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").exists():
            assert time.time() < deadline and first.poll() is None, "the first run did not get going"
            time.sleep(0.1)
        assert f"pid {first.pid}" in (out / ".lock").read_text()
        started = time.time()
        second = run_train(args, check=False, timeout=120)
        assert second.returncode == 2 and "in use by another run" in error_line(second), second.stderr[-2000:]
        assert f"pid {first.pid}" in error_line(second)
        assert time.time() - started < 60 and first.poll() is None  # at once, and the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    third = run_train([*args[:-2], "--max_steps", str(step + 1), "--resume_from_checkpoint", "latest"])
    assert f"pid {first.pid}" in third.stdout and "taking it over" in third.stdout
    assert (out / ".lock").read_text() == ""  # released at the end


def test_sweep_points_that_share_a_folder_are_refused_at_submission(tmp_path):
    from fine_tune.core.errors import UserError
    from fine_tune.launchers.submission import parse_submission

    for grid, shown in [("learning_rate: [2.0e-5, 0.00002]", "point 1 (learning_rate: 2e-05) and point 2"),
                        ("wandb_tags: ['a b', a-b]", "point 1 (wandb_tags: a b) and point 2 (wandb_tags: a-b)")]:
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(f"grid:\n  {grid}\n")
        with pytest.raises(UserError) as e:
            parse_submission(["--cluster", "local", "--sweep", str(sweep), "--", "--output_dir", str(tmp_path / "s")])
        assert shown in str(e.value) and "same folder" in str(e.value)
    assert not (tmp_path / "s").exists()


def test_a_kill_during_the_final_save_keeps_the_previous_final_and_results(setup, tiny_model):
    out = copy_run(setup, "final_kill")
    final_before, results_before = files_of(out / "final"), (out / "eval_results.json").read_text()
    args = train_args(tiny_model, setup["files"], out, max_steps=10, per_device_train_batch_size=4,
                      save_strategy="steps", save_steps=2, save_total_limit=4) + ["--resume_from_checkpoint", "latest"]
    env = {**ENV, "FINE_TUNE_TEST_KILL_IN_FINAL_SAVE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert files_of(out / "final") == final_before
    assert (out / "eval_results.json").read_text() == results_before
    run_train(args)  # the next run completes the job and cleans up
    assert json.loads((out / "eval_results.json").read_text())["global_step"] == 10
    assert files_of(out / "final") != final_before
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_cutting_metrics_back_never_leaves_a_cut_file(tmp_path):
    """A full disk (here a file-size limit) while metrics.jsonl is cut back on resume."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "pad": "x" * 80}) + "\n" for s in range(1, 2001)))
    before = path.read_text()
    code = ("import resource, signal, sys\n"
            "from pathlib import Path\n"
            "from fine_tune.core.tracking import truncate_metrics\n"
            "limit = int(sys.argv[2])\n"
            "if limit:  # over the limit a write fails with EFBIG, as on a full disk\n"
            "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
            "try:\n    truncate_metrics(Path(sys.argv[1]), 1500)\nexcept OSError as e:\n    print('write failed:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), "50000"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert "write failed" in proc.stdout, proc.stdout + proc.stderr
    assert path.read_text() == before and not list(tmp_path.glob(".*.tmp"))
    subprocess.run([sys.executable, "-c", code, str(path), "0"], cwd=ROOT, env=ENV, check=True)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, 1501))


def test_nodes_that_do_not_share_the_output_folder_fail_at_start(setup, tiny_model):
    """Two ranks whose working folders differ, given the same relative --output_dir: each sees
    its own folder, as nodes with a local disk each would."""
    from conftest import free_port

    port, procs = str(free_port()), []
    args = train_args(tiny_model, setup["files"], "run", max_steps=4, per_device_train_batch_size=2)
    for rank in range(2):
        node = setup["tmp"] / f"node{rank}"
        node.mkdir()
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=node, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs[0][1][-2000:]
    for _, err in outs:
        assert "not shared by every node (rank 1 on" in err and "filesystem all nodes share" in err
    assert not (setup["tmp"] / "node0" / "run" / "final").exists()


# ------------------------------------------------------------------ 2. nothing runs code
class Planted:
    """Unpickling this creates a file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))


def test_a_planted_pickle_in_a_checkpoint_runs_no_code(setup, tiny_model):
    step_8 = setup["ckpt_run"] / "checkpoints" / "step_8"
    assert (step_8 / "scheduler.json").exists() and not list(step_8.glob("custom_checkpoint_*"))

    def resume(out):
        args = train_args(tiny_model, setup["files"], out, max_steps=10, per_device_train_batch_size=4)
        return run_train(args + ["--resume_from_checkpoint", "latest"], check=False)

    # accelerate's custom-state file (what older checkpoints held): refused as foreign, never unpickled
    out = copy_run(setup, "planted_custom")
    marker = setup["tmp"] / "ran_custom"
    plant(out / "checkpoints" / "step_8" / "custom_checkpoint_0.pkl", marker)
    proc = resume(out)
    assert not marker.exists()
    assert proc.returncode == 2 and "custom_checkpoint_0.pkl was not written by fine_tune" in error_line(proc)
    # the optimizer file replaced, and the manifest rewritten to match, as a deliberate attacker would
    from fine_tune.core.checkpoint import write_manifest

    out = copy_run(setup, "planted_optimizer")
    marker = setup["tmp"] / "ran_optimizer"
    ckpt = out / "checkpoints" / "step_8"
    plant(ckpt / "optimizer.bin", marker)
    write_manifest(ckpt)
    proc = resume(out)
    assert not marker.exists()
    assert proc.returncode == 2 and "could not be loaded" in error_line(proc), proc.stderr[-2000:]


def test_scheduler_state_round_trips_through_json():
    import torch

    from fine_tune.core.config import SCHEDULERS, TrainConfig
    from fine_tune.core.optim import build_scheduler

    kwargs = {"step": '{"step_size": 3}', "cosine_with_min_lr": '{"min_lr_rate": 0.1}',
              "cosine_warmup_with_min_lr": '{"min_lr_rate": 0.1}', "warmup_stable_decay": '{"num_decay_steps": 5}'}
    for name in SCHEDULERS:
        if name == "greedy":
            continue  # needs a model-specific argument set; not JSON-specific
        cfg = TrainConfig(lr_scheduler_type=name, warmup_steps=2, lr_scheduler_kwargs=kwargs.get(name)).validate()

        def make():
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            return opt, build_scheduler(opt, cfg, 20)

        opt_a, a = make()
        for i in range(5):
            opt_a.step()
            a.step(1.0 / (i + 1)) if "plateau" in name else a.step()
        opt_b, b = make()
        opt_b.load_state_dict(opt_a.state_dict())  # the learning rate itself lives in the optimizer's state
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for i in range(5):
            for opt, s in ((opt_a, a), (opt_b, b)):
                opt.step()
                s.step(1.0) if "plateau" in name else s.step()
            assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"], name


def test_metric_scripts_need_trust_remote_code(setup, tiny_model, tmp_path):
    marker = tmp_path / "metric_ran"
    script = tmp_path / "my_metric.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "out"
    proc = run_train(train_args(tiny_model, setup["files"], out, max_steps=2) + ["--metric", str(script)],
                     check=False)
    assert proc.returncode == 2 and "--trust_remote_code true" in error_line(proc), proc.stderr[-2000:]
    assert not marker.exists() and not out.exists()
    # what the tool computes itself needs nothing, and loads no script
    run_train(train_args(tiny_model, setup["files"], out, max_steps=2) + ["--metric", "accuracy"])


def test_models_with_their_own_code_load_with_trust_remote_code(setup, tiny_model, tmp_path):
    model = tmp_path / "custom_model"
    shutil.copytree(tiny_model, model)
    (model / "configuration_tiny.py").write_text(
        "from transformers import BertConfig\n\n\nclass TinyConfig(BertConfig):\n    model_type = 'tiny-bert'\n")
    (model / "modeling_tiny.py").write_text(
        "from transformers import BertForSequenceClassification\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyModel(BertForSequenceClassification):\n    config_class = TinyConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tiny-bert", auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                                                    "AutoModelForSequenceClassification": "modeling_tiny.TinyModel"})
    (model / "config.json").write_text(json.dumps(config))
    args = train_args(model, setup["files"], tmp_path / "out", max_steps=2)
    proc = run_train(args, check=False)
    assert proc.returncode == 2 and "--trust_remote_code true" in error_line(proc), proc.stderr[-2000:]
    run_train(args + ["--trust_remote_code", "true"])
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------ 5. the manifest
def test_a_damaged_checkpoint_is_reported_as_corrupt_and_a_load_error_is_not(setup, tiny_model, tmp_path):
    def resume(out, model=tiny_model, *extra):
        args = train_args(model, setup["files"], out, max_steps=10, per_device_train_batch_size=4)
        return run_train(args + ["--resume_from_checkpoint", "latest", *extra], check=False)

    ckpt = setup["ckpt_run"] / "checkpoints" / "step_8"
    assert set(json.loads((ckpt / "manifest.json").read_text())["files"]) >= \
        {"model.safetensors", "optimizer.bin", "config.yaml", "train_state.json", "scheduler.json"}
    # config.yaml changed in place (same size, still valid YAML, another learning rate)
    out = copy_run(setup, "damaged_config")
    config = out / "checkpoints" / "step_8" / "config.yaml"
    assert "learning_rate: 0.001\n" in config.read_text()
    config.write_text(config.read_text().replace("learning_rate: 0.001\n", "learning_rate: 0.002\n"))
    proc = resume(out)
    assert proc.returncode == 2 and "step_8 is corrupt (config.yaml differs" in error_line(proc), proc.stderr[-2000:]
    # one byte of the weights flipped: still a loadable safetensors file
    out = copy_run(setup, "damaged_weights")
    weights = out / "checkpoints" / "step_8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = resume(out)
    assert proc.returncode == 2 and "corrupt (model.safetensors differs" in error_line(proc), proc.stderr[-2000:]
    # intact files that do not fit the model: a load error, not corruption
    from transformers import BertConfig, BertForSequenceClassification

    other = tmp_path / "other_model"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=3,
                                             id2label=dict(enumerate(LABELS)))).save_pretrained(other)
    shutil.copy(Path(tiny_model) / "tokenizer.json", other)
    shutil.copy(Path(tiny_model) / "tokenizer_config.json", other)
    out = copy_run(setup, "other_model")
    proc = resume(out, other, "--ignore_config_mismatch", "true")
    assert proc.returncode == 2 and "intact" in error_line(proc) and "corrupt" not in error_line(proc), \
        proc.stderr[-2000:]


# ------------------------------------------------------------------ 6. the best model is the one kept
def test_load_best_model_at_end_keeps_the_best_evaluations_weights(setup, tiny_model, tmp_path):
    """`greater_is_better` on the eval loss makes the earliest evaluation the best one (the loss
    falls as it trains): a deterministic run whose best step is not its last."""
    files = {**setup["files"], "test": setup["files"]["validation"]}  # test == validation: same numbers expected
    out = tmp_path / "best"
    args = train_args(tiny_model, files, out, max_steps=8, per_device_train_batch_size=4, eval_strategy="steps",
                      eval_steps=2, metric_for_best_model="loss", greater_is_better="true",
                      load_best_model_at_end="true", test_file=files["test"])
    run_train(args)
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    best = max(evals, key=evals.get)
    assert best != 8 and sorted(evals) == [2, 4, 6, 8]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["final_model_step"] == best and results["global_step"] == 8
    final, kept = load_weights(out / "final"), load_weights(out / "checkpoints" / f"step_{best}")
    assert all((final[k] == kept[k]).all() for k in final)
    assert results["eval_loss"] == pytest.approx(evals[best], abs=1e-6)
    assert results["test_loss"] == pytest.approx(evals[best], abs=1e-6)
    # early stopping turns it on by default; without it the last weights are kept
    out = tmp_path / "early"
    run_train(train_args(tiny_model, files, out, max_steps=8, per_device_train_batch_size=4, eval_strategy="steps",
                         eval_steps=2, metric_for_best_model="loss", greater_is_better="true",
                         early_stopping_patience=2))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["load_best_model_at_end"] is True and results["final_model_step"] == best
    out = tmp_path / "last"
    run_train(train_args(tiny_model, files, out, max_steps=8, per_device_train_batch_size=4, eval_strategy="steps",
                         eval_steps=2, metric_for_best_model="loss", greater_is_better="true"))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["load_best_model_at_end"] is False and results["final_model_step"] == 8


def test_deepspeed_checkpoints_resume_with_weights_only_loads(setup, tiny_model):
    """DeepSpeed's own loader asks torch.load for weights_only=False; under
    TORCH_FORCE_WEIGHTS_ONLY_LOAD its files must still load (ZeRO-2, 2 processes, gloo)."""
    out = setup["tmp"] / "deepspeed"
    args = train_args(tiny_model, setup["files"], out, per_device_train_batch_size=4, save_strategy="steps",
                      save_steps=2)
    run_train(args + ["--max_steps", "2"], "deepspeed_zero2.yaml", 2)
    proc = run_train(args + ["--max_steps", "4", "--resume_from_checkpoint", "latest"], "deepspeed_zero2.yaml", 2)
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
