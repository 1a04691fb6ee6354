"""--task causal-lm for real: a tiny Llama trained as a language model by train.py, and the
proof that its loss is the mean over every target token of the global batch whatever the
topology.

The data is prompt -> completion with completions of very uneven lengths (1 to 40 tokens), so
that a normalisation per micro-batch (or per process) instead of over the step's tokens would
change the weights far beyond the tolerance (tests/unit/test_causal_lm_masks.py shows by how much).
The tokenizer is a GPT-2 style byte-level BPE without a pad token (decoders' usual case).
"""

import json
import math
import random
import signal
import subprocess

import pytest
import torch

from conftest import ENV, ROOT, WORDS, launch_cmd, max_change, read_metrics, relative_difference, run_train, \
    train_args, write_jsonl
from test_fault_tolerance import assert_same_run, wait_for_step
from test_large_models import byte_level_tokenizer

TOLERANCE = 1e-4  # of the largest weight change, as tests/test_topologies.py
STEPS = 8
LR = 3e-3  # as tests/test_topologies.py: float32's one-ulp floor stays far below the tolerance
# Adam epsilon 1e-4, not the 1e-6 of the other comparisons. A language model's embedding rows of
# tokens seen once or twice (prompt tokens are inputs only, never targets) get tiny gradients
# that are partly float summation noise, and near epsilon 1e-6 Adam divides that noise by a
# denominator of its own size, turning it into updates of the learning rate's order. Measured on
# this data (8 steps, lr 3e-3), largest weight difference over the largest weight change:
#   epsilon 1e-6: correct loss 2.4e-5 (4 x 2, DDP, ZeRO-2) and 2.7e-5 (2 x 4): a 4x margin only;
#                 per-micro-batch normalisation 0.66 (4 x 2), 1.24 (2 x 4), 0.66 (DDP);
#   epsilon 1e-4: correct loss 8.8e-6 (4 x 2, 2 x 4, DDP, ZeRO-2), 4.4e-6 (ZeRO-3): an 11x margin;
#                 per-micro-batch normalisation 0.43 (4 x 2), 0.66 (2 x 4), 0.44 (DDP).
# At 1e-4 the tolerance measures the maths with a wide margin on both sides.
ADAM_EPSILON = 1e-4


def rows(n: int, seed: int) -> list[dict]:
    """Prompts of 2 to 12 words, completions of 1 to 40 words (one token each, or nearly)."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + " :",
             "completion": "".join(" " + rng.choice(WORDS) for _ in range(rng.choice((1, 2, 3, 20, 40))))}
            for _ in range(n)]


def save_llama(folder):
    """A 2-layer Llama (hidden 32) for language modelling, with a tokenizer that has no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer("right")
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reloaded(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def compared_args(model, files, out, **overrides):
    opts = {"task": "causal-lm", "max_steps": STEPS, "learning_rate": LR, "adam_epsilon": ADAM_EPSILON,
            "max_length": 64, **overrides}
    return train_args(model, files, out, **opts)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal_lm")
    model = save_llama(tmp / "llama")
    files = {"train": write_jsonl(tmp / "train.jsonl", rows(61, seed=1)),
             "validation": write_jsonl(tmp / "validation.jsonl", rows(16, seed=2))}
    out = tmp / "single_b8"
    # evaluated at the last step: evaluation does not change the training
    proc = run_train(compared_args(model, files, out, per_device_train_batch_size=8, eval_strategy="steps",
                                   eval_steps=STEPS))
    return {"tmp": tmp, "model": model, "files": files, "out": out, "proc": proc,
            "weights": reloaded(out / "final"), "init": reloaded(model), "metrics": read_metrics(out)}


def test_the_data_is_uneven(reference):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference["model"])
    lengths = [len(tok(json.loads(line)["completion"])["input_ids"])
               for line in reference["files"]["train"].read_text().splitlines()]
    assert min(lengths) == 1 and max(lengths) >= 40


def test_evaluation_reports_loss_and_perplexity(reference):
    (last,) = [r for r in reference["metrics"] if "eval_loss" in r]
    assert last["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]), rel=1e-6)
    first_loss = next(r["loss"] for r in reference["metrics"] if "loss" in r)
    assert last["eval_loss"] < first_loss  # it learned something in 8 steps
    assert "eval_perplexity" in reference["proc"].stdout


TOPOLOGIES = {
    # name: (accelerate config, processes, per-device batch, accumulation)
    "1 process, 4 x 2 accumulation": (None, None, 4, 2),
    "1 process, 2 x 4 accumulation": (None, None, 2, 4),
    "2 processes (gloo), batch 4": ("cpu_ddp.yaml", 2, 4, 1),
    "DeepSpeed ZeRO-2, 2 processes": ("deepspeed_zero2.yaml", 2, 4, 1),
    "DeepSpeed ZeRO-3, 2 processes": ("deepspeed_zero3.yaml", 2, 4, 1),
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_same_weights_as_one_process(name, reference):
    config, nproc, bs, acc = TOPOLOGIES[name]
    out = reference["tmp"] / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    run_train(compared_args(reference["model"], reference["files"], out, per_device_train_batch_size=bs,
                            gradient_accumulation_steps=acc), config, nproc)
    assert max_change(reference["weights"], reference["init"]) > 6e-3  # it trained
    assert relative_difference(reloaded(out / "final"), reference["weights"], reference["init"]) < TOLERANCE
    # the logged loss is the step's mean over all its target tokens, on every topology
    mine = [r["loss"] for r in read_metrics(out) if "loss" in r]
    ref = [r["loss"] for r in reference["metrics"] if "loss" in r]
    assert mine == pytest.approx(ref, rel=1e-4)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def shape_rows(shape: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))  # noqa: E731
    if shape == "text":
        return [{"text": words(30)} for _ in range(n)]
    return [{"messages": [{"role": "system", "content": words(5)}, {"role": "user", "content": words(10)},
                          {"role": "assistant", "content": words(10)}, {"role": "user", "content": words(5)},
                          {"role": "assistant", "content": words(3)}]} for _ in range(n)]


@pytest.mark.parametrize("shape", ["text", "messages"])
def test_trains_from_text_and_from_chat_messages(shape, reference):
    from transformers import AutoTokenizer

    tmp = reference["tmp"] / shape
    tmp.mkdir()
    model = reference["model"]
    if shape == "messages":  # the same model, its tokenizer given a chat template
        model = tmp / "llama_chat"
        model.mkdir()
        for f in reference["model"].iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        tok = AutoTokenizer.from_pretrained(reference["model"])
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(model)
    files = {"train": write_jsonl(tmp / "train.jsonl", shape_rows(shape, 24, 1)),
             "validation": write_jsonl(tmp / "validation.jsonl", shape_rows(shape, 8, 2))}
    out = tmp / "run"
    run_train(train_args(model, files, out, task="causal-lm", max_steps=3, per_device_train_batch_size=8,
                         eval_strategy="steps", eval_steps=3, learning_rate=LR))
    (last,) = [r for r in read_metrics(out) if "eval_loss" in r]
    assert math.isfinite(last["eval_loss"]) and last["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    assert max_change(reloaded(out / "final"), reference["init"]) > 1e-3  # it trained


def test_lora_adapts_the_body_and_leaves_the_lm_head(reference):
    out = reference["tmp"] / "lora"
    run_train(train_args(reference["model"], reference["files"], out, task="causal-lm", use_peft="true",
                         max_steps=2, per_device_train_batch_size=8, learning_rate=LR))
    assert (out / "final" / "adapter").is_dir()
    config = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    merged, init = reloaded(out / "final"), reference["init"]
    assert torch.equal(merged["lm_head.weight"], init["lm_head.weight"])  # no adapter, not trained
    assert any(not torch.equal(merged[k], init[k]) for k in merged if "self_attn" in k)  # the merged adapters


def test_a_packed_run_trains_on_blocks_of_examples(reference):
    """--packing through train.py: the 61 examples become fewer blocks of up to --max_length
    tokens (the start line counts blocks), the run trains, and evaluation (unpacked) reports the
    same kind of loss. The equality of packed and unpacked losses is tests/unit/test_causal_lm_masks.py's."""
    out = reference["tmp"] / "packed"
    proc = run_train(compared_args(reference["model"], reference["files"], out, per_device_train_batch_size=2,
                                   packing="true", eval_strategy="steps", eval_steps=STEPS))
    blocks = int(proc.stdout.split(" examples: ")[0].rsplit(" on ", 1)[1])
    assert 15 < blocks < 61, proc.stdout
    assert max_change(reloaded(out / "final"), reference["init"]) > 6e-3
    (last,) = [r for r in read_metrics(out) if "eval_loss" in r]
    assert last["eval_samples"] == 16 and math.isfinite(last["eval_loss"])


def test_a_packed_run_resumes_bit_exact_after_sigkill(reference):
    """Killed at a random step and resumed from its last checkpoint, a packed run (over two
    epochs of blocks) ends with the weights and step losses of the run never interrupted."""
    opts = dict(per_device_train_batch_size=2, packing="true", max_steps=24, save_strategy="steps", save_steps=4)
    ref = reference["tmp"] / "packed_uninterrupted"
    proc = run_train(compared_args(reference["model"], reference["files"], ref, **opts))
    assert "24 optimizer steps" in proc.stdout
    out = reference["tmp"] / "packed_killed"
    args = compared_args(reference["model"], reference["files"], out, **opts)
    proc = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(out, random.Random().randint(5, 18), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout
    assert_same_run(out, ref)
