"""Peak host memory per rank: full fine-tuning against LoRA, fp32 against bf16 weights, DDP against ZeRO-3.

    python bench/large_models_memory.py                    # the CPU cases, a 167M-parameter Llama
    python bench/large_models_memory.py --cases lora_fp32,lora_bf16 --layers 4
    python bench/large_models_memory.py --size 0.5b --cases full_fp32_autocast,lora_bf16,fsdp2_full_bf16 \
        --steps 20 --batch 16 --max_length 128                            # on one GPU

A random Llama-style decoder classifier (GQA, SwiGLU; 167m: 12 layers of 1024, 0.5b: the shape
of Qwen2.5-0.5B; the default MiniLM's WordPiece tokenizer, which has a pad token) is saved in
bf16 to a temporary folder, as decoder checkpoints on the hub are, then each case
trains it for a few optimizer steps on the default sentiment data through train.py itself,
in a fresh launcher process. The peak reported is the largest resident set of any process
the case started (the kernel's ru_maxrss of waited-for children), so for two ranks it is the
peak of the larger rank. It covers loading, training and saving final/: under ZeRO-3 the model
is built inside deepspeed.zero.Init, so no rank ever holds the whole model. Next to it, the
peak of rank 0 up to the last optimizer step (`peak_rss_mb` in metrics.jsonl): training alone.

Prints a markdown table; the numbers depend on the machine but the ratios do not much. On a
GPU the table adds the loop's own peak GPU memory (torch's max_memory_allocated), tokens/s
and MFU of the last step; `fsdp2_full_bf16` (FSDP2 in one process) needs a GPU. The cases run
one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]

# name: (what, accelerate config or None for one plain process, processes, train.py flags)
CASES = {
    "full_fp32": ("full fine-tune, fp32 weights, 1 process", None, 1, []),
    "full_fp32_autocast": ("full fine-tune, fp32 weights, bf16 autocast, 1 process", None, 1,
                           ["--mixed_precision", "bf16"]),
    "lora_fp32": ("LoRA r16 all-linear, fp32 weights, 1 process", None, 1, ["--use_peft", "true"]),
    "lora_bf16": ("LoRA r16 all-linear, bf16 weights + bf16 autocast, 1 process", None, 1,
                  ["--use_peft", "true", "--torch_dtype", "bfloat16", "--mixed_precision", "bf16"]),
    "ddp_full_fp32": ("full fine-tune, fp32, DDP 2 processes", "cpu_ddp.yaml", 2, []),
    "zero2_full_fp32": ("full fine-tune, fp32, ZeRO-2 2 processes", "deepspeed_zero2.yaml", 2, []),
    "zero3_full_fp32": ("full fine-tune, fp32, ZeRO-3 2 processes", "deepspeed_zero3.yaml", 2, []),
    "zero3_full_fp32_4": ("full fine-tune, fp32, ZeRO-3 4 processes", "deepspeed_zero3.yaml", 4, []),
    "fsdp2_full_bf16": ("full fine-tune, fp32 weights, bf16 autocast, FSDP2 1 process (GPU)", "fsdp.yaml", 1,
                        ["--mixed_precision", "bf16"]),
}
CPU_CASES = [name for name in CASES if name != "fsdp2_full_bf16"]
# (hidden, intermediate, heads, key-value heads, layers): 167m is this page's CPU model;
# 0.5b has Qwen2.5-0.5B's shape (24 layers of 896), with the MiniLM tokenizer's smaller vocabulary
SIZES = {"167m": (1024, 2816, 16, 4, 12), "0.5b": (896, 4864, 14, 2, 24)}


def save_model(folder: Path, size: str, layers: int | None) -> int:
    """A random Llama classifier with the MiniLM tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fine_tune.core.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    names = LABELS
    hidden, intermediate, heads, kv_heads, default_layers = SIZES[size]
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers or default_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, num_labels=5, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}))
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk, as decoder checkpoints on the hub are
    tokenizer.save_pretrained(folder)
    return n


def run_case(name: str, model: Path, out: Path, steps: int, batch: int, max_length: int) -> dict:
    what, config, processes, flags = CASES[name]
    if config is None:
        launcher = [sys.executable, str(ROOT / "train.py")]
    else:
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                    str(ROOT / "accelerate_configs" / config), "--num_processes", str(processes),
                    "--main_process_port", "0", str(ROOT / "train.py")]
    per_device = str(batch // processes)  # the same sentences per optimizer step everywhere
    args = ["--model_name_or_path", str(model), "--train_file", str(ROOT / "data" / "sentiment" / "train.jsonl"),
            "--output_dir", str(out / name), "--max_steps", str(steps), "--per_device_train_batch_size", per_device,
            "--max_length", str(max_length), "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
            "--max_eval_samples", "16", "--per_device_eval_batch_size", "8",
            "--disable_tqdm", "true", "--label_names", ",".join(LABELS), *flags]
    # A fixed mmap threshold gives every block over 128 KiB back to the system when it is freed;
    # glibc's default (a threshold that grows with use) keeps freed blocks, which on CPU added up
    # to 1 GiB per rank to ZeRO-3's peak, memory no tensor was using.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    # A fresh process per case, so RUSAGE_CHILDREN holds this case's processes alone.
    probe = ("import resource, subprocess, sys\n"
             "rc = subprocess.run(sys.argv[1:]).returncode\n"
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *launcher, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb, rc = (int(x) for x in proc.stdout.split("PEAK_KB")[-1].split())
    if rc != 0:
        raise SystemExit(f"{name} failed ({rc}):\n{proc.stderr[-3000:]}")
    start_line = next(line for line in proc.stdout.splitlines() if line.startswith("training "))
    params = start_line.split("(", 1)[1].split(") on")[0]
    logs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    last = steps[-1]
    return {"case": name, "what": what, "params": params, "train_peak_mib": last["peak_rss_mb"],
            "peak_mib": peak_kb / 1024, "seconds": seconds, "last_loss": last["loss"],
            "peak_gpu_mib": last.get("peak_gpu_mb"), "tokens_per_second": last.get("tokens_per_second"),
            "mfu": last.get("mfu")}


def print_table(rows: list[dict]) -> None:
    gpu = any(r["peak_gpu_mib"] for r in rows)
    extra = " peak GPU memory | tokens/s | MFU |" if gpu else ""
    print(f"\n| case | parameters (start line) | peak RSS, rank 0, training | peak RSS, any rank, whole run |{extra}"
          f" time |\n|---|---|---|---|{'---|---|---|' if gpu else ''}---|")
    for r in rows:
        cells = ""
        if gpu:
            gpu_mib, tokens, mfu = r["peak_gpu_mib"], r["tokens_per_second"], r["mfu"]
            cells = (f" {f'{gpu_mib:,.0f} MiB' if gpu_mib else '-'} | {f'{tokens:,.0f}' if tokens else '-'} |"
                     f" {f'{mfu:.1%}' if mfu is not None else '-'} |")
        print(f"| {r['what']} | {r['params']} | {r['train_peak_mib']:,.0f} MiB | {r['peak_mib']:,.0f} MiB |{cells}"
              f" {r['seconds']:.0f} s |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CPU_CASES), help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--size", default="167m", choices=SIZES, help="model shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers, if not the shape's own")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per case")
    p.add_argument("--batch", type=int, default=8, help="sentences per optimizer step (split over the processes)")
    p.add_argument("--max_length", type=int, default=64, help="tokens per sentence at most")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = save_model(tmp / "model", args.size, args.layers)
        weights = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors"))
        print(f"model: random Llama ({args.size}), {n / 1e6:.1f}M parameters, "
              f"{weights / 2**20:.0f} MiB of bf16 weights on disk", flush=True)
        rows = []
        for name in names:
            rows.append(run_case(name, tmp / "model", tmp / "runs", args.steps, args.batch, args.max_length))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)

if __name__ == "__main__":
    main()
