"""Decoder models as classifiers, LoRA through peft, and the loading options for large models.

Tiny random decoders (Llama: rotary positions; GPT-2: absolute positions and Conv1D layers)
built from a config, with a byte-level BPE tokenizer trained here that, like GPT-2's, has no
pad token. Real processes throughout: train.py, `accelerate launch` with gloo, a real
DeepSpeed engine on its CPU accelerator, real peft.
"""

import json
import random
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ENV, LABELS, ROOT, WORDS, launch_cmd, load_weights, read_metrics, relative_difference, \
    run_recipe, run_train, small_files, train_args
from test_fault_tolerance import assert_same_run, wait_for_step

TOLERANCE = 1e-4
STEPS = 8


def byte_level_tokenizer(padding_side: str):
    """A GPT-2 style tokenizer (byte-level BPE, an end-of-text token, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4 + WORDS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   padding_side=padding_side)


def save_decoder(folder, kind: str, padding_side: str = "right"):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tokenizer = byte_level_tokenizer(padding_side)
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    labels = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **labels))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, **labels))
    assert model.config.pad_token_id is None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("large_models")
    return {"tmp": tmp, "files": small_files(tmp), "llama": save_decoder(tmp / "llama", "llama")}


def lora_args(model, files, out, **kw):
    return train_args(model, files, out, use_peft="true", **kw)


def lora_equivalence_args(model, files, out, **kw):
    """LoRA dropout off: its masks are drawn per micro-batch, so they differ between topologies."""
    return lora_args(model, files, out, lora_dropout=0.0, max_steps=STEPS, **kw)


def reloaded(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).state_dict()


def texts_of(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_decoder_classifier_trains_predicts_and_loads_in_a_pipeline(setup, mode):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    llama, files = setup["llama"], setup["files"]
    out = setup["tmp"] / f"decoder_{mode}"
    args = train_args(llama, files, out, per_device_train_batch_size=8, max_steps=STEPS, save_strategy="steps",
                      save_steps=4, test_file=files["validation"], **({"use_peft": "true"} if mode == "lora" else {}))
    proc = run_train(args)
    final = out / "final"
    # the start line gives total and trainable parameters (LoRA: 16.4K in adapters, 96 in the head)
    assert ("(44.8K parameters, 16.5K trainable (36.81%))" if mode == "lora" else "(28.3K parameters)") in proc.stdout

    # the missing pad token is the end-of-text token, in the tokenizer and in the model config
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert AutoModelForSequenceClassification.from_pretrained(final).config.pad_token_id == tokenizer.eos_token_id

    # final/ is a plain model a pipeline batches (so it pads) on either side, predicting what
    # the loop's own evaluation predicted: the same last real token is pooled
    texts = texts_of(files["validation"])
    gold = [json.loads(line)["label"] for line in files["validation"].read_text().splitlines()]
    predictions = {}
    for side in ("right", "left"):
        classify = pipeline("text-classification", model=str(final))
        classify.tokenizer.padding_side = side
        predictions[side] = [p["label"] for p in classify(texts, batch_size=8, truncation=True, max_length=64)]
    assert predictions["left"] == predictions["right"]
    accuracy = sum(p == g for p, g in zip(predictions["right"], gold)) / len(gold)
    results = json.loads((out / "eval_results.json").read_text())
    assert accuracy == pytest.approx(results["test_accuracy"])

    ckpt = out / "checkpoints" / "step_8"
    if mode == "full":
        assert not (final / "adapter").exists()
        assert set(load_weights(ckpt)) == set(load_weights(final))
        return
    # LoRA: final/adapter is the adapter alone; peft puts it on the base model and gets the
    # merged model's logits
    from peft import PeftModel

    adapter = adapter_of(out)
    assert adapter and all("lora_" in k or ".score." in k for k in adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0  # it trained
    base = AutoModelForSequenceClassification.from_pretrained(llama, pad_token_id=tokenizer.eos_token_id)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(with_adapter(**batch).logits, merged(**batch).logits, atol=1e-5)
    # checkpoints hold the trainable weights only (adapters and the head), not the frozen model
    saved = load_weights(ckpt)
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.7 * sum(v.numel() for v in load_weights(final).values())
    # `fine-tune export` of the last checkpoint: the merged model equals final/, and
    # --adapter_only final/adapter, weight for weight
    for flags, folder, theirs in (([], "exported", final), (["--adapter_only"], "adapter_only", final / "adapter")):
        subprocess.run([sys.executable, "-m", "fine_tune", "export", str(ckpt), str(out / folder), *flags], cwd=ROOT,
                       env=ENV, check=True, capture_output=True)
        name = "adapter_model.safetensors" if flags else "model.safetensors"
        mine, ref = load_weights_file(out / folder / name), load_weights_file(theirs / name)
        assert sorted(mine) == sorted(ref) and all(torch.equal(mine[k], ref[k]) for k in ref), folder


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_and_right_padding_train_the_same(setup, kind):
    """GPT-2's positions are absolute: left padding moves every text unless the position ids
    start at its first real token. LoRA on GPT-2 also covers its Conv1D layers."""
    results = []
    for side in ("right", "left"):
        model = save_decoder(setup["tmp"] / f"{kind}_{side}", kind, side)
        out = setup["tmp"] / f"padding_{kind}_{side}"
        run_train(lora_args(model, setup["files"], out, per_device_train_batch_size=8, max_steps=3,
                            lora_dropout=0.0, eval_strategy="steps", eval_steps=3))
        results.append((read_metrics(out), reloaded(out / "final")))
    (metrics_r, weights_r), (metrics_l, weights_l) = results
    losses = [[r.get("loss", r.get("eval_loss")) for r in m] for m in (metrics_r, metrics_l)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert all(torch.allclose(weights_r[k], weights_l[k], atol=1e-6) for k in weights_r)


# ---------------------------------------------------------------- LoRA on every topology
TOPOLOGIES = {
    # name: (accelerate config, processes, per-device batch, accumulation, extra launch flags)
    "1 process, 4 x 2 accumulation": (None, None, 4, 2, []),
    "2 processes (gloo), batch 4": ("cpu_ddp.yaml", 2, 4, 1, []),
    "DeepSpeed ZeRO-2, 2 processes": ("deepspeed_zero2.yaml", 2, 4, 1, []),
    "DeepSpeed ZeRO-3, 2 processes": ("deepspeed_zero3.yaml", 2, 4, 1, []),
    # the model loads whole on each rank, LoRA wraps it, then DeepSpeed shards it
    "DeepSpeed ZeRO-3 without zero.Init, 2 processes": ("deepspeed_zero3.yaml", 2, 4, 1,
                                                        ["--zero3_init_flag", "false"]),
}


@pytest.fixture(scope="module")
def lora_reference(setup):
    """One process, batch 8; and the adapter as it starts (it depends on the seed alone)."""
    from peft import get_peft_model_state_dict

    from fine_tune.core.config import parse_args
    from fine_tune.core.model import load_model, load_tokenizer

    out = setup["tmp"] / "lora_single_b8"
    args = lora_equivalence_args(setup["llama"], setup["files"], out, per_device_train_batch_size=8)
    run_train(args)
    cfg = parse_args([str(a) for a in args])

    class Labels:
        num_labels, id2label, label2id = 3, dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}

    initial = get_peft_model_state_dict(load_model(cfg, Labels, load_tokenizer(cfg)))
    return {"out": out, "initial": {k: v.detach().clone() for k, v in initial.items()}}


def load_weights_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def adapter_of(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_lora_same_trainable_weights_on_every_topology(name, setup, lora_reference):
    config, nproc, bs, acc, launch = TOPOLOGIES[name]
    out = setup["tmp"] / ("lora_" + name.replace(" ", "_").replace(",", "").replace(".", ""))
    proc = run_train(lora_equivalence_args(setup["llama"], setup["files"], out, per_device_train_batch_size=bs,
                                           gradient_accumulation_steps=acc), config, nproc, extra_launch=launch)
    # ZeRO-3 builds the model sharded (zero.Init): the count must still be the full model's
    assert "(44.8K parameters, 16.5K trainable" in proc.stdout
    assert f"({nproc or 1} process(es) x {bs} x {acc} accumulation)" in proc.stdout
    ref, init = adapter_of(lora_reference["out"]), lora_reference["initial"]
    assert set(ref) == set(init)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 2e-3  # it trained
    assert relative_difference(adapter_of(out), ref, init) < TOLERANCE
    # and the merged final/ (ZeRO-3: gathered from the shards) agrees as well
    base = reloaded(setup["llama"])
    assert relative_difference(reloaded(out / "final"), reloaded(lora_reference["out"] / "final"), base) < TOLERANCE


ZERO3_PROBE = """
import json, sys
from fine_tune.core.config import parse_args
from fine_tune.core.loop import make_accelerator
from fine_tune.core.model import load_model, load_tokenizer

class Labels:
    num_labels, id2label, label2id = 3, {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}

cfg = parse_args(sys.argv[1:])
accelerator = make_accelerator(cfg)
model = load_model(cfg, Labels, load_tokenizer(cfg))
params = list(model.parameters())
print(json.dumps({"sharded": all(hasattr(p, "ds_tensor") for p in params),
                  "held": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
                  "full": sum(getattr(p, "ds_numel", p.numel()) for p in params)}))
"""


def test_zero3_never_holds_the_whole_model_on_one_rank(setup, tmp_path):
    """Under ZeRO-3, load_model builds the model inside zero.Init: right after loading, each of
    2 ranks holds half of every weight, not the whole model."""
    script = tmp_path / "probe.py"
    script.write_text(ZERO3_PROBE)
    args = train_args(setup["llama"], setup["files"], tmp_path / "unused", use_peft="false")
    cmd = launch_cmd("deepspeed_zero3.yaml", 2)[:-1] + [str(script)] + args
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"sharded"')]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["sharded"] and rank["full"] == 28288
        assert rank["held"] <= rank["full"] / 2 + 64  # DeepSpeed pads each shard to an even split


def test_lora_resume_after_sigkill_is_bit_exact(setup):
    """LoRA dropout on (the default 0.05): the RNG streams must be restored too."""
    files = setup["files"]
    opts = dict(per_device_train_batch_size=2, max_steps=40, save_strategy="steps", save_steps=4)  # 31 steps/epoch
    ref = setup["tmp"] / "lora_uninterrupted"
    run_train(lora_args(setup["llama"], files, ref, **opts))
    out = setup["tmp"] / "lora_killed"
    args = lora_args(setup["llama"], files, out, **opts)
    proc = subprocess.Popen(launch_cmd(None) + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(out, random.Random().randint(9, 28), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(args + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout
    assert_same_run(out, ref)
    a, b = adapter_of(out), adapter_of(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- loading options
@pytest.mark.parametrize("flags,message", [
    ({"attn_implementation": "flash_attention_2"}, "error: --attn_implementation flash_attention_2 needs a GPU"),
    ({"torch_dtype": "float16"}, "error: --torch_dtype 'float16' is not allowed: float16 weights train only with"),
    ({"torch_dtype": "bfloat16", "use_peft": "true"}, "error: the frozen weights are bfloat16"),
    ({"use_peft": "true", "lora_modules_to_save": "classifier"}, "error: --lora_modules_to_save: "
     "LlamaForSequenceClassification has no module 'classifier'; its task head is score"),
])
def test_impossible_loading_choices_fail_in_one_line(setup, flags, message):
    out = setup["tmp"] / "refused"
    proc = run_train(train_args(setup["llama"], setup["files"], out, max_steps=1, **flags), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_decoder_lora_recipe_bf16_weights_and_gradient_checkpointing(setup):
    """recipes/decoder_lora.yaml on the tiny decoder: frozen bf16 weights (half the memory),
    float32 adapters and head under bf16 autocast, and gradient checkpointing."""
    data = setup["tmp"] / "recipe_data"
    data.mkdir()
    for split, source in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        (data / f"{split}.jsonl").write_text(setup["files"][source].read_text())
    out = setup["tmp"] / "lora_bf16"
    run_recipe("decoder_lora.yaml", data, out, model_name_or_path=setup["llama"], label_names="negative,neutral,positive",
               max_steps=2, per_device_train_batch_size=8, gradient_checkpointing="true", learning_rate=1e-3)
    adapter = adapter_of(out)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    assert {v.dtype for k, v in load_weights(out / "final").items() if "layers" in k} == {torch.bfloat16}


def test_fsdp_config_is_fsdp2(tmp_path):
    """The FSDP config as `accelerate launch` reads it (FSDP itself needs GPUs, see test_topologies)."""
    script = tmp_path / "probe.py"
    script.write_text("import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('FSDP_')}))")
    cmd = launch_cmd("fsdp.yaml", 1)[:-1] + [str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads(proc.stdout.strip().splitlines()[-1])
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
