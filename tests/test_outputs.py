"""What a finished run leaves behind, and the precision / clipping options, checked for real."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ENV, LABELS, ROOT, load_weights, read_metrics, run_train, train_args


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    from conftest import make_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("outputs")
    files = {"train": write_jsonl(tmp / "train.jsonl", make_rows(120, seed=1)),
             "validation": write_jsonl(tmp / "validation.jsonl", make_rows(30, seed=2)),
             "test": write_jsonl(tmp / "test.jsonl", make_rows(30, seed=3))}
    out = tmp / "run"
    proc = run_train(train_args(tiny_model, files, out, num_train_epochs=2, eval_strategy="epoch",
                                save_strategy="epoch", logging_steps=5, test_file=files["test"],
                                per_device_train_batch_size=4))
    return {"tmp": tmp, "files": files, "out": out, "stdout": proc.stdout}


def test_output_files(finished):
    out = finished["out"]
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "samples_per_second",
            "tokens_per_second"} <= set(train[0])
    assert {"eval_accuracy", "eval_f1_weighted", "eval_f1_macro", "eval_precision_macro",
            "eval_recall_weighted"} <= set(evals[0])
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    assert len(evals) == 2 and evals[-1]["step"] == train[-1]["step"]  # once per epoch
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert "test_accuracy" in results and results["test_samples"] == 30
    cfg = (out / "config.yaml").read_text()
    assert "num_train_epochs: 2.0" in cfg and "learning_rate: 0.001" in cfg
    assert "final metrics:" in finished["stdout"] and f"model saved to {out / 'final'}" in finished["stdout"]


def test_final_model_loads_in_a_pipeline(finished):
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(finished["out"] / "final"))
    preds = clf(["a great lovely movie", "an awful terrible film"])
    assert {p["label"] for p in preds} <= set(LABELS)
    assert len(preds) == 2


def test_predict_scores_a_labelled_file_and_labels_an_unlabelled_one(finished):
    model = str(finished["out"] / "final")
    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.predict", "--model", model, "--file",
                           str(finished["files"]["test"])], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "true \\ predicted" in proc.stdout and '"accuracy"' in proc.stdout
    results = json.loads((finished["out"] / "eval_results.json").read_text())
    shown = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert shown["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-4)
    unlabelled = finished["tmp"] / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "lovely"}\n{"text": "terrible plot"}\n')
    preds = finished["tmp"] / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "fine_tune.commands.predict", "--model", model, "--file", str(unlabelled),
                           "--output", str(preds)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 2 and all(r["label"] in LABELS and 0 < r["score"] <= 1 for r in rows)


def test_bf16_autocast_on_cpu(tiny_model, data_files, tmp_path):
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        proc = run_train(train_args(tiny_model, data_files, out, max_steps=4, mixed_precision=precision))
        assert f"mixed precision {precision}" in proc.stdout
        losses[precision] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses["no"] != losses["bf16"]  # autocast really ran in bfloat16 ...
    assert losses["bf16"] == pytest.approx(losses["no"], rel=3e-2)  # ... and computed the same thing


def test_clipping_bounds_the_update(tiny_model, data_files, tmp_path):
    """With a huge Adam epsilon the first update is lr * g / eps, so its size shows the clip."""
    init = load_weights(tiny_model)
    sizes = {}
    for max_norm in (0.0, 0.001):
        out = tmp_path / f"clip{max_norm}"
        run_train(train_args(tiny_model, data_files, out, max_steps=1, learning_rate=1.0, adam_epsilon=1e3,
                             weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=max_norm))
        w = load_weights(out / "final")
        sizes[max_norm] = float(torch.sqrt(sum(((w[k] - init[k]) ** 2).sum() for k in w)))
        grad_norm = read_metrics(out)[0]["grad_norm"]  # logged before clipping
    assert grad_norm > 0.01  # the raw gradient is far above the clip ...
    assert sizes[0.001] == pytest.approx(1.0 / 1e3 * 0.001, rel=1e-2)  # ... and the update is bounded by it
    assert sizes[0.0] == pytest.approx(1.0 / 1e3 * grad_norm, rel=1e-2)  # 0 disables clipping


def test_torch_compile_writes_a_loadable_final(tiny_model, data_files, tmp_path):
    """--torch_compile compiles the model in place: checkpoints and final/ hold the model's own
    weight names (no ``_orig_mod.``), and final/ loads with nothing missing or unexpected.
    Fixed shapes and no evaluation keep inductor to one compilation (about a minute on CPU)."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "compiled"
    args = train_args(tiny_model, data_files, out, max_steps=2, save_strategy="steps", save_steps=1,
                      torch_compile="true", padding="max_length", max_length=16, validation_split_percentage=0)
    at = args.index("--validation_file")
    del args[at:at + 2]
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for weights in (out / "final", out / "checkpoints" / "step_1"):
        names = list(load_weights(weights))
        assert names and not [n for n in names if "_orig_mod" in n], weights
    model, info = AutoModelForSequenceClassification.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (tmp_path / "inductor").is_dir()  # it really compiled
