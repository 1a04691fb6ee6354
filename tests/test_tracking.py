"""Tracking: TensorBoard events and the offline W&B run hold what metrics.jsonl holds, at the
same optimizer steps; a resumed run continues the same W&B run and TensorBoard shows each
step once; W&B trouble never stops training; only the main process logs."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import ENV, ROOT, launch_cmd, read_metrics, run_train, train_args

TB_TRAIN_TAGS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_second",
                 "train/tokens_per_second", "train/peak_rss_mb", "train/epoch")
TB_EVAL_TAGS = ("eval/loss", "eval/accuracy", "eval/f1_weighted", "eval/f1_macro")


# ------------------------------------------------------------------ readers
def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """Records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then
    LevelDB-log framed protobuf records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_run(run_dir: Path) -> dict:
    """Run id, config and history ({step: {key: value}}) of one offline W&B run folder."""
    (run_file,) = run_dir.glob("run-*.wandb")
    out = {"id": None, "config": {}, "history": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            out["history"].setdefault(int(row["_step"]), {}).update(row)
    return out


def config_value(config: dict, key: str):
    value = config[key]
    return value["value"] if isinstance(value, dict) and "value" in value else value


def flat_series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def assert_series(got, want) -> None:
    """Same steps, same values (TensorBoard stores float32)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free now, and nothing listens on it


# ------------------------------------------------------------------ tests
def test_tensorboard_and_wandb_hold_the_metrics_and_a_resume_continues_the_run(tiny_model, data_files, tmp_path):
    out = tmp_path / "run"
    common = dict(report_to="tensorboard,wandb", eval_strategy="steps", eval_steps=2, save_strategy="steps",
                  save_steps=3, per_device_train_batch_size=8, run_name="track-test", wandb_group="g1",
                  wandb_tags="a,b")
    run_train(train_args(tiny_model, data_files, out, max_steps=4, **common))
    first = read_metrics(out)

    # TensorBoard: grouped tags, at the optimizer steps, with the values of metrics.jsonl
    scalars = tensorboard_scalars(out / "tensorboard")
    for tag in TB_TRAIN_TAGS:
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    for tag in TB_EVAL_TAGS:
        assert [s for s, _ in scalars[tag]] == [2, 4], tag
    assert_series(scalars["train/loss"], flat_series(first, "loss"))
    assert_series(scalars["eval/accuracy"], flat_series(first, "eval_accuracy"))
    assert not any(tag.startswith(("loss", "eval_", "learning_rate")) for tag in scalars)  # no flat names

    # W&B offline: one run, holding the same metrics at the same steps and the run config
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    state = json.loads((out / "checkpoints" / "step_3" / "train_state.json").read_text())
    assert run["id"] == state["tracker_ids"]["wandb"] and run_dir.name.endswith(run["id"])
    history = run["history"]
    assert sorted(history) == [1, 2, 3, 4]
    assert_series([(s, history[s]["train/loss"]) for s in sorted(history)], flat_series(first, "loss"))
    assert_series([(s, history[s]["eval/accuracy"]) for s in sorted(history) if "eval/accuracy" in history[s]],
                  flat_series(first, "eval_accuracy"))
    config = run["config"]
    assert config_value(config, "learning_rate") == pytest.approx(1e-3)
    assert config_value(config, "world_size") == 1
    assert config_value(config, "mixed_precision") == "no"
    assert config_value(config, "distributed_type") == "NO"
    assert len(config_value(config, "git_commit")) == 40
    versions = config_value(config, "versions")
    assert {"torch", "transformers", "accelerate", "python"} <= set(versions)

    # resume from step 3 up to step 6: the same W&B run, TensorBoard shows every step once
    run_train(train_args(tiny_model, data_files, out, max_steps=6, resume_from_checkpoint="latest", **common))
    second = read_metrics(out)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    resumed = wandb_run(next(r for r in runs if r != run_dir))
    assert resumed["id"] == run["id"]
    assert sorted(resumed["history"]) == [4, 5, 6]
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_series(scalars["train/loss"], flat_series(second, "loss"))  # step 4 from the resumed run
    assert [s for s, _ in scalars["eval/accuracy"]] == [2, 4, 6]
    elapsed = [r["elapsed_s"] for r in second]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # wall time carries over the resume


def test_unreachable_wandb_warns_once_and_training_goes_on(tiny_model, data_files, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    env["WANDB_BASE_URL"] = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(launch_cmd(None) + train_args(tiny_model, data_files, out, max_steps=3,
                                                         report_to="tensorboard,wandb"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "offline" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert sorted(wandb_run(run_dir)["history"]) == [1, 2, 3]
    assert [s for s, _ in tensorboard_scalars(out / "tensorboard")["train/loss"]] == [1, 2, 3]


def test_only_the_main_process_logs(tiny_model, data_files, tmp_path):
    out = tmp_path / "ddp"
    run_train(train_args(tiny_model, data_files, out, max_steps=2, per_device_train_batch_size=4,
                         report_to="tensorboard,wandb"), accelerate_config="cpu_ddp.yaml", nproc=2)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    assert config_value(run["config"], "world_size") == 2
    assert sorted(run["history"]) == [1, 2]
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2]  # one line per event, not one per process


class _FakeAccelerator:
    is_main_process = True
    num_processes = 1
    mixed_precision = "no"
    distributed_type = "NO"

    def __init__(self):
        self.trackers = []


class _Failing:
    name = "tensorboard"
    requires_logging_directory = False
    tracker = None

    def __init__(self):
        self.calls = 0

    def log(self, values, step=None, **kwargs):
        self.calls += 1
        raise ConnectionError("server went away")

    def finish(self):
        raise ConnectionError("server went away")


def test_a_failing_tracker_warns_once_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    from fine_tune.core.checkpoint import TrainState
    from fine_tune.core.config import parse_args
    from fine_tune.core.tracking import Tracker

    failing = _Failing()
    monkeypatch.setattr(Tracker, "_tensorboard", lambda self, state: failing)

    def broken_wandb(self, state):
        raise RuntimeError("wandb exploded at start")

    monkeypatch.setattr(Tracker, "_wandb", broken_wandb)
    cfg = parse_args(["--output_dir", str(tmp_path), "--report_to", "all"])
    accelerator = _FakeAccelerator()
    tracker = Tracker(accelerator, cfg, TrainState(), {"learning_rate": 1e-3})
    assert tracker.active == ["tensorboard"]  # W&B dropped at start, TensorBoard kept
    for step in (1, 2, 3):
        tracker.log({"epoch": 0.1 * step, "loss": 1.0 / step}, step)
    accelerator.trackers[0].finish()  # what accelerator.end_training() does: must not raise
    err = capsys.readouterr().err
    assert err.count("warning: W&B disabled") == 1
    assert err.count("TensorBoard logging failed") == 1 and failing.calls == 1
    assert "closing TensorBoard failed" in err
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[2]["loss"] == pytest.approx(1 / 3)


def test_tracker_names_round_trip():
    from fine_tune.core.tracking import flat_name, tracker_name

    for key, tag in (("loss", "train/loss"), ("learning_rate", "train/learning_rate"),
                     ("eval_accuracy", "eval/accuracy"), ("eval_f1_weighted", "eval/f1_weighted"),
                     ("test_loss", "test/loss"), ("peak_rss_mb", "train/peak_rss_mb")):
        assert tracker_name(key) == tag
        assert flat_name(tag) == key
