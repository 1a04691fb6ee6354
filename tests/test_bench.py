"""The throughput benchmark, end to end on the tiny model: every mode runs, sees the same
examples, and reports numbers that agree with each other and with the data."""

from __future__ import annotations

import json

import pytest

from conftest import make_rows, write_jsonl

STEPS, WARMUP, BATCH, MAX_LENGTH = 4, 1, 8, 64


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    from fine_tune.commands import bench

    tmp = tmp_path_factory.mktemp("bench")
    train = write_jsonl(tmp / "train.jsonl", make_rows(STEPS * BATCH + 5, seed=3))
    held_out = write_jsonl(tmp / "validation.jsonl", make_rows(20, seed=4))
    out = tmp / "bench.json"
    result = bench.main(["--model", str(tiny_model), "--train_file", str(train), "--eval_file", str(held_out),
                         "--eval_samples", "16", "--batch_size", str(BATCH), "--steps", str(STEPS),
                         "--warmup_steps", str(WARMUP), "--max_length", str(MAX_LENGTH), "--repeats", "1",
                         "--modes", "a,b,c,d", "--peak_flops", "1e12", "--json", str(out), "--timeout", "300"])
    return result, json.loads(out.read_text()), tiny_model, train


def test_structure(report):
    result, written, _, _ = report
    assert written["summary"] == json.loads(json.dumps(result["summary"]))
    for mode in "abcd":
        s = result["summary"][mode]
        assert (s["runs"], s["failed"]) == (1, 0), result["runs"][mode]
        for key in ("samples_per_second", "tokens_per_second", "padding_share", "step_ms", "data_ms", "forward_ms",
                    "backward_ms", "optimizer_ms", "peak_rss_mb", "eval_accuracy", "mfu"):
            assert s[key]["min"] <= s[key]["median"] <= s[key]["max"], (mode, key, s[key])
        assert f"| {mode}: " in result["table"]
    assert "d_vs_c_step_time_pct" in result["comparisons"]
    assert any("bare loop" in n for n in result["notes"])


def test_every_mode_trains_on_the_same_examples(report):
    from transformers import AutoTokenizer

    result, _, model, train = report
    rows = [json.loads(line) for line in train.read_text().splitlines()][:STEPS * BATCH]
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in rows], truncation=True,
                                             max_length=MAX_LENGTH)["input_ids"]]
    for mode in "abcd":
        run = result["runs"][mode][0]
        assert run["steps"] == STEPS and run["timed_steps"] == STEPS - WARMUP
        assert run["examples_all"] == STEPS * BATCH and run["examples_timed"] == (STEPS - WARMUP) * BATCH
        assert run["tokens_all"] == sum(lengths), mode  # the same examples, non-padding tokens counted
    # the bare loop and train.py run on identical batches
    c, d = result["runs"]["c"][0], result["runs"]["d"][0]
    assert (c["tokens_timed"], c["positions_timed"]) == (d["tokens_timed"], d["positions_timed"])


def test_numbers_are_consistent(report):
    result, _, _, _ = report
    runs = {m: result["runs"][m][0] for m in "abcd"}
    a = runs["a"]
    # padding to max length: every position of every timed example is fed to the model
    assert a["positions_all"] == STEPS * BATCH * MAX_LENGTH
    assert a["padding_share"] == pytest.approx(1 - a["tokens_timed"] / (a["examples_timed"] * MAX_LENGTH))
    for dynamic in "bcd":
        assert a["padding_share"] > runs[dynamic]["padding_share"] + 0.2, (dynamic, runs[dynamic]["padding_share"])
    for mode, run in runs.items():
        assert 0 <= run["padding_share"] < 1
        mean_tokens = run["tokens_timed"] / run["examples_timed"]
        assert 2 < mean_tokens <= MAX_LENGTH
        assert run["tokens_per_second"] == pytest.approx(run["samples_per_second"] * mean_tokens, rel=1e-9)
        assert run["samples_per_second"] == pytest.approx(run["examples_timed"] / run["window_s"], rel=1e-9)
        assert run["step_ms"] == pytest.approx(1000 * run["window_s"] / run["timed_steps"], rel=1e-9)
        phases = [run[f"{p}_ms"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(p > 0 for p in phases), (mode, phases)
        assert sum(phases) <= run["step_ms"] * 1.001, (mode, phases, run["step_ms"])
        assert 0 <= run["eval_accuracy"] <= 1 and run["eval_samples"] == 16
        assert run["peak_rss_mb"] > 50
        assert run["mfu"] == pytest.approx(6 * run["n_matmul_params"] * run["tokens_per_second"] / 1e12)
        assert 0 < run["n_matmul_params"] < run["n_params"]
    assert runs["a"]["trainer_optim"] and runs["b"]["trainer_sampling"] == "group_by_length"
    assert runs["b"]["adamw_fused"] is True
    assert runs["c"]["adamw_fused"] == runs["d"]["adamw_fused"]  # the same optimizer: identical work
    # the loop's own log agrees with the benchmark's clock on the same steps
    assert runs["d"]["loop_reported_samples_per_second"] == pytest.approx(runs["d"]["samples_per_second"], rel=0.5)


def test_bad_mode_is_refused():
    from fine_tune.commands import bench

    with pytest.raises(SystemExit, match="unknown option 'bf17'"):
        bench.main(["--modes", "d+bf17"])
    assert bench.parse_mode("e", "bf16,fused", "fp32") == bench.parse_mode("d+bf16+fused", "", "fp32")


def test_long_workload_fills_every_input(tiny_model, tmp_path):
    """--workload long joins consecutive texts into inputs of max_length tokens: no padding,
    every input full, tokens/s and MFU in the report."""
    from fine_tune.commands import bench

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=5))
    held_out = write_jsonl(tmp_path / "validation.jsonl", make_rows(8, seed=6))
    result = bench.main(["--model", str(tiny_model), "--train_file", str(train), "--eval_file", str(held_out),
                         "--eval_samples", "8", "--batch_size", "4", "--steps", "3", "--warmup_steps", "1",
                         "--max_length", "48", "--repeats", "1", "--modes", "d", "--workload", "long",
                         "--peak_flops", "1e12", "--timeout", "300"])
    run = result["runs"]["d"][0]
    assert "error" not in run, run.get("log_tail")
    assert run["positions_all"] == 3 * 4 * 48 and run["tokens_all"] == run["positions_all"]  # full, unpadded
    assert run["mfu"] > 0 and result["config"]["workload"] == "long"
