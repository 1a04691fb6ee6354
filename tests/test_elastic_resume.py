"""A run resumed on another number of processes ends where the uninterrupted run ends.

The global batch (8) is kept: 2 processes x 4 resume as 1 process x 4 x 2 accumulation, and
1 x 8 as 2 x 4. The sampler's order depends only on the seed, the epoch and the global batch,
so the resumed run sees the same global batches; its weights must match the uninterrupted
run's to the topology tests' tolerance (the split changes only the float summation order),
and so must every step's loss after the resume. DeepSpeed ZeRO-2/3 reshard through
DeepSpeed's universal checkpoint. Tiny BERT, dropout off, float32, 61 examples: the last step
is short and splits unevenly over two ranks.

Each interrupted run stops mid-run with the test hook that fails the save of step 8 (the
checkpoint of step 4 stays ``latest``) and is resumed with ``--resume_from_checkpoint latest``
on the other world size, as a requeued job would be.
"""

import json
import re

import pytest

from conftest import ENV, launch_cmd, read_metrics, relative_difference, run_train, small_files, train_args
from test_topologies import LR, TOLERANCE, reloaded

STEPS = 8
CRASH = {"FINE_TUNE_TEST_CRASH_BEFORE_RENAME": "8"}  # the save of step 8 fails: step_4 is latest


def args(tiny_model, files, out, **kw):
    return train_args(tiny_model, files, out, max_steps=STEPS, learning_rate=LR, save_strategy="steps",
                      save_steps=4, **kw)


def losses(out, after=0):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r and r["step"] > after]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One process, batch 8, never stopped."""
    tmp = tmp_path_factory.mktemp("elastic")
    files = small_files(tmp)
    out = tmp / "uninterrupted"
    run_train(args(tiny_model, files, out, per_device_train_batch_size=8))
    return {"files": files, "tmp": tmp, "out": out, "weights": reloaded(out / "final"), "init": reloaded(tiny_model)}


def interrupted(tiny_model, reference, name, config, nproc, batch):
    """A run stopped mid-run (the save of step 8 fails); its folder holds step_4 as latest."""
    import subprocess

    from conftest import ROOT

    out = reference["tmp"] / name
    run_args = args(tiny_model, reference["files"], out, per_device_train_batch_size=batch)
    proc = subprocess.run(launch_cmd(config, nproc) + run_args, cwd=ROOT, env={**ENV, **CRASH},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert not (out / "final").exists()
    return out, run_args


def check_same_run(out, reference):
    relative = relative_difference(reloaded(out / "final"), reference["weights"], reference["init"])
    assert relative < TOLERANCE
    # every step's loss after the resume is the uninterrupted run's (the global mean of the step)
    mine, theirs = losses(out, after=4), losses(reference["out"], after=4)
    assert [s for s, _ in mine] == [s for s, _ in theirs] == list(range(5, STEPS + 1))
    assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-4)
    return relative


def refused_with_status_2(proc) -> bool:
    """The first rank to end exited with status 2: torchrun reports it as the root cause, ends
    the others and exits 1 itself."""
    return bool(re.search(r"Root Cause.*\n.*\n.*\n.*\n.*\n\s*exitcode\s*:\s*2 ", proc.stderr))


CASES = {
    # name: (accelerate config, processes before, per-device batch before, processes after, printed split after)
    "DDP 2 to 1": ("cpu_ddp.yaml", 2, 4, 1, "per-device batch 4 x accumulation 2 x 1"),
    "DDP 1 to 2": ("cpu_ddp.yaml", 1, 8, 2, "per-device batch 8 x accumulation 1 x 2"),
    "ZeRO-2 2 to 1": ("deepspeed_zero2.yaml", 2, 4, 1, "per-device batch 4 x accumulation 2 x 1"),
    "ZeRO-3 2 to 1": ("deepspeed_zero3.yaml", 2, 4, 1, "per-device batch 4 x accumulation 2 x 1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resume_on_another_world_size(name, reference, tiny_model):
    config, before, batch, after, split = CASES[name]
    first = None if before == 1 and config == "cpu_ddp.yaml" else config  # one plain process
    out, run_args = interrupted(tiny_model, reference, name.replace(" ", "_"), first, before, batch)
    if name == "DDP 1 to 2":  # 8 per device on 2 processes would double the global batch: refused
        refused = run_train(run_args + ["--resume_from_checkpoint", "latest"], config, after, check=False)
        assert refused_with_status_2(refused)
        assert "fine_tune/core" not in refused.stderr  # no traceback of ours (the launcher prints its own)
        assert [line for line in refused.stderr.splitlines() if line.startswith("error:")][0] == (
            "error: the checkpoint's global batch of 8 (8 x 1 accumulation x 1 process(es)) is not kept by "
            "--per_device_train_batch_size 8 --gradient_accumulation_steps 1 on 2 process(es); use "
            "--per_device_train_batch_size 4 --gradient_accumulation_steps 1, or pass --ignore_config_mismatch "
            "to change the global batch")
        run_args = args(tiny_model, reference["files"], out, per_device_train_batch_size=4)
        split = "per-device batch 4 x accumulation 1 x 2"
    resumed = run_train(run_args + ["--resume_from_checkpoint", "latest"],
                        None if after == 1 and config == "cpu_ddp.yaml" else config, after)
    assert f"resumed from {out / 'checkpoints' / 'step_4'} at step 4" in resumed.stdout
    assert f"{split} keeps the global batch of 8" in resumed.stdout
    state = json.loads((out / "checkpoints" / "step_8" / "train_state.json").read_text())
    assert state["world_size"] == after  # the next resume compares with this world
    assert not list((out / "checkpoints").glob(".universal-*"))  # a conversion is removed once loaded
    relative = check_same_run(out, reference)
    print(f"{name}: worst relative weight difference {relative:.2e}")


def test_indivisible_global_batch_is_refused_in_one_line(reference, tiny_model):
    """A global batch of 8 cannot be split over 3 processes: refused before any work."""
    out = reference["out"]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = run_train(args(tiny_model, reference["files"], out, per_device_train_batch_size=8) +
                     ["--resume_from_checkpoint", "latest"], "cpu_ddp.yaml", 3, check=False)
    assert refused_with_status_2(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0] == (
        "error: the checkpoint's global batch of 8 (8 x 1 accumulation x 1 process(es)) cannot be split over "
        "3 processes; resume on 1, 2, 4, 8 processes, or pass --ignore_config_mismatch to change the global batch")
    assert "fine_tune/core" not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
