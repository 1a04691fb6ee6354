"""compare: on three real runs that differ in learning rate and scheduler, the table shows
exactly those two options plus metrics that equal the runs' own files, sorts correctly in
every format, and writes a real plot; W&B input fails clearly offline and is read right."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ENV, ROOT, launch_cmd, make_rows, read_metrics, train_args, write_jsonl

RUNS = {"lr1e-3-linear": (1e-3, "linear"), "lr3e-3-cosine": (3e-3, "cosine"), "lr1e-4-constant": (1e-4, "constant")}
OPTION_COLUMNS = ["learning_rate", "lr_scheduler_type"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Three short runs, identical but for learning rate and scheduler (run side by side)."""
    root = tmp_path_factory.mktemp("sweep")
    files = {"train": write_jsonl(root / "train.jsonl", make_rows(61, seed=1)),
             "validation": write_jsonl(root / "validation.jsonl", make_rows(23, seed=2))}
    procs = {}
    for name, (lr, scheduler) in RUNS.items():
        args = train_args(tiny_model, files, root / "runs" / name, learning_rate=lr, lr_scheduler_type=scheduler,
                          max_steps=6, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=8)
        procs[name] = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    return root / "runs"


def compare_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fine_tune.commands.compare", *map(str, args)], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=300)


def direct(run_dir, metric: str, greater: bool):
    """Best and final value of an eval metric, straight from the run's own files."""
    values = [r[metric] for r in read_metrics(run_dir) if metric in r]
    final = json.loads((run_dir / "eval_results.json").read_text())[metric]
    return (max(values) if greater else min(values)), final


def test_table_shows_exactly_the_differing_options_and_true_metrics(runs):
    from fine_tune.commands import compare

    out = compare.table([runs / name for name in RUNS], fmt="json")
    rows = json.loads(out)
    assert len(rows) == 3
    columns = list(rows[0])
    metric_columns = ["best_eval_accuracy", "best_step", "final_eval_accuracy", "final_eval_loss", "steps",
                      "wall_time_s", "samples_per_second"]
    assert columns == ["run"] + OPTION_COLUMNS + metric_columns
    for row in rows:
        run_dir = runs / row["run"]
        lr, scheduler = RUNS[row["run"]]
        assert (row["learning_rate"], row["lr_scheduler_type"]) == (lr, scheduler)
        best, final = direct(run_dir, "eval_accuracy", greater=True)
        assert (row["best_eval_accuracy"], row["final_eval_accuracy"]) == (best, final)
        records = read_metrics(run_dir)
        assert row["final_eval_loss"] == json.loads((run_dir / "eval_results.json").read_text())["eval_loss"]
        assert row["steps"] == 6
        throughput = [r["samples_per_second"] for r in records if "samples_per_second" in r]
        assert row["samples_per_second"] == pytest.approx(np.mean(throughput))
        assert row["wall_time_s"] == max(r["elapsed_s"] for r in records) > 0

    markdown = compare.table([runs / name for name in RUNS])
    header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
    assert header == ["run"] + OPTION_COLUMNS + [("wall_time" if c == "wall_time_s" else c) for c in metric_columns]
    assert markdown.splitlines()[1].startswith("|---")
    assert len(markdown.strip().splitlines()) == 2 + 3


def test_sorting_by_any_metric_in_every_format(runs):
    from fine_tune.commands import compare

    dirs = [runs / name for name in RUNS]
    # eval_loss: lower is better, so ascending by the best (lowest) loss
    expected = sorted(RUNS, key=lambda n: direct(runs / n, "eval_loss", greater=False)[0])
    rows = json.loads(compare.table(dirs, sort_by="eval_loss", fmt="json"))
    assert [r["run"] for r in rows] == expected
    assert [r["best_eval_loss"] for r in rows] == sorted(r["best_eval_loss"] for r in rows)
    assert [c for c in rows[0] if "eval_loss" in c] == ["best_eval_loss", "final_eval_loss"]  # no repeat

    # the same order from the CLI, given as a glob, in CSV and markdown, with W&B-style names
    for fmt in ("csv", "markdown"):
        proc = compare_cli(str(runs / "lr*"), "--sort_by", "eval/loss", "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        if fmt == "csv":
            order = [r["run"] for r in csv.DictReader(io.StringIO(proc.stdout))]
        else:
            order = [line.split("|")[1].strip() for line in proc.stdout.strip().splitlines()[2:]]
        assert order == expected, fmt

    # accuracy (the default metric): higher is better, ties broken by name
    rows = json.loads(compare.table([runs], fmt="json"))  # a folder of runs stands for all of them
    assert len(rows) == 3
    keys = [(-r["best_eval_accuracy"], r["run"]) for r in rows]
    assert keys == sorted(keys)
    f1 = json.loads(compare.table(dirs, sort_by="f1_macro", fmt="json"))
    keys = [(-r["best_eval_f1_macro"], r["run"]) for r in f1]
    assert keys == sorted(keys)


def test_plot_is_a_real_image_labelled_by_what_differs(runs, tmp_path):
    from PIL import Image

    from fine_tune.commands import compare

    out = tmp_path / "compare.png"
    proc = compare_cli(*[runs / n for n in RUNS], "--plot", out, "--sort_by", "eval_loss")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| run ")
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 400
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    # three coloured lines (matplotlib's first three default colours) on a white canvas
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 30).sum() > 200, colour
    labels = compare.run_labels(compare.load_runs([runs / n for n in RUNS]))
    assert labels["lr1e-3-linear"] == "learning_rate=0.001, lr_scheduler_type=linear"
    assert labels["lr1e-4-constant"] == "learning_rate=0.0001, lr_scheduler_type=constant"


def test_user_errors_are_one_line(runs, tmp_path):
    proc = compare_cli(tmp_path / "nope")
    assert proc.returncode == 2 and "no such run folder" in proc.stderr and proc.stderr.count("\n") == 1
    proc = compare_cli(runs / "lr1e-3-linear", "--sort_by", "bleu")
    assert proc.returncode == 2 and "available: " in proc.stderr and "eval_accuracy" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = compare_cli(empty)
    assert proc.returncode == 2 and "holds no run" in proc.stderr


def test_wandb_without_network_is_a_clear_error():
    proc = compare_cli("--wandb", "team/project")  # the tests run with WANDB_MODE=offline
    assert proc.returncode == 2 and "WANDB_MODE=offline" in proc.stderr and proc.stderr.count("\n") == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    env["WANDB_BASE_URL"] = f"http://127.0.0.1:{port}"
    proc = compare_cli("--wandb", "team/project", "--group", "sweep", env=env)
    assert proc.returncode == 2 and "cannot reach W&B" in proc.stderr and proc.stderr.count("\n") == 1


class _FakeRun:
    def __init__(self, id, name, lr, history, runtime):
        self.id, self.name, self.state = id, name, "finished"
        self.config = {"learning_rate": lr, "seed": 1, "output_dir": f"runs/{name}", "versions": {"torch": "x"},
                       "_wandb": {"internal": 1}}
        self.summary = {"_runtime": runtime, "test/accuracy": 0.5}
        self._history = history

    def scan_history(self):
        return iter(self._history)


class _FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_runs_are_read_like_local_runs():
    from fine_tune.commands import compare

    api = _FakeApi([
        _FakeRun("a1", "slow", 1e-4, [{"_step": 1, "train/loss": 1.0, "train/samples_per_second": 10.0},
                                      {"_step": 2, "eval/accuracy": 0.6, "eval/loss": 0.9, "_runtime": 3}], 42.0),
        _FakeRun("b2", "fast", 1e-3, [{"_step": 1, "train/loss": 0.8, "train/samples_per_second": 30.0},
                                      {"_step": 2, "eval/accuracy": 0.7, "eval/loss": 0.7},
                                      {"_step": 4, "eval/accuracy": 0.65, "eval/loss": 0.8}], 50.0),
    ])
    runs = compare.load_wandb_runs("team/project", group="sweep-1", api=api)
    assert api.calls == [("team/project", {"group": "sweep-1"})]
    columns, rows, metric = compare.rows(runs)
    assert metric == "eval_accuracy"
    assert [r["run"] for r in rows] == ["fast", "slow"]
    assert columns[:2] == ["run", "learning_rate"]  # output_dir and run metadata are not options
    fast = rows[0]
    assert (fast["best_eval_accuracy"], fast["best_step"], fast["final_eval_accuracy"]) == (0.7, 2, 0.65)
    assert fast["final_eval_loss"] == 0.8 and fast["test_accuracy"] == 0.5
    assert (fast["steps"], fast["wall_time_s"], fast["samples_per_second"]) == (4, 50.0, 30.0)
