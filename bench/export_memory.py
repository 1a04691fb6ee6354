"""Peak memory of `fine-tune export` against the size of the weights it writes.

    python bench/export_memory.py                 # bert-large-sized (335M parameters, 1.3 GB in fp32)
    python bench/export_memory.py --layers 12 --hidden 768

Builds a random BERT of the given shape as the "pre-trained" model, and a one-process step
checkpoint of it (model.safetensors with other weights, config.yaml, train_state.json,
labels.json, manifest.json: what the loop writes, less the optimizer state, which export never
reads), then runs `fine-tune export` in a child process and prints the child's peak resident
memory (ru_maxrss) next to the size of the weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    from fine_tune.core.checkpoint import write_manifest
    from fine_tune.core.config import TrainConfig, save_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, num_labels=2,
                            id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        model = BertForSequenceClassification(config)
        model.save_pretrained(tmp / "base")
        from transformers import AutoTokenizer

        from fine_tune.core.model import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TrainConfig().model_name_or_path))
        tokenizer.save_pretrained(tmp / "base")
        ckpt = tmp / "run" / "checkpoints" / "step_1"
        ckpt.mkdir(parents=True)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01)  # "trained": the export must take these, not the base weights
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
        weights = (ckpt / "model.safetensors").stat().st_size
        del model
        save_config(TrainConfig(model_name_or_path=str(tmp / "base"), output_dir=str(tmp / "run")).validate(),
                    ckpt / "config.yaml")
        (ckpt / "train_state.json").write_text(json.dumps({"global_step": 1}))
        (ckpt / "labels.json").write_text(json.dumps({"names": ["neg", "pos"]}))
        write_manifest(ckpt)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fine_tune", "export", str(ckpt), str(tmp / "exported")], cwd=ROOT,
                       check=True, capture_output=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        n = sum(t.numel() for t in load_file(str(tmp / "exported" / "model.safetensors")).values())
    print(f"BERT {args.layers} layers, hidden {args.hidden}: {n / 1e6:.0f}M parameters, weights "
          f"{weights / 2 ** 30:.2f} GiB (fp32); export peak RSS {peak / 2 ** 30:.2f} GiB "
          f"({peak / weights:.2f}x the weights), {seconds:.0f} s")


if __name__ == "__main__":
    main()
