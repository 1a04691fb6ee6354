"""How long a stop signal needs: one optimizer step plus one checkpoint, for a model on this machine.

    python bench/checkpoint_time.py              # the default MiniLM
    python bench/checkpoint_time.py bert-base    # a bert-base-sized model built from a config

Saves through the loop's own code (checkpoint.save_checkpoint: accelerate state, AdamW
moments, RNG states, fsync, rename) into a temporary folder, three times; prints the
median step and save times and the checkpoint size. The lead time to configure (Slurm's
--signal, submitit's signal delay, torchrun's grace period) must exceed step + save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="minilm", choices=("minilm", "bert-base"),
                   help="the default MiniLM, or bert-base-sized: BertConfig() defaults, 12 layers, hidden 768 (110M)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch
    from accelerate import Accelerator

    from fine_tune.core import checkpoint as C
    from fine_tune.core.config import TrainConfig
    from fine_tune.core.data import LabelInfo
    from fine_tune.core.model import load_model
    from fine_tune.core.optim import build_optimizer, build_scheduler

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output_dir=tmp, save_total_limit=1).validate()
        labels = LabelInfo(names=["a", "b", "c", "d", "e"])
        if args.model == "bert-base":
            from transformers import BertConfig, BertForSequenceClassification

            model, name = BertForSequenceClassification(BertConfig(num_labels=5)), "bert-base-sized (from BertConfig())"
        else:
            model, name = load_model(cfg, labels), cfg.model_name_or_path
        accelerator = Accelerator(cpu=True)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, 100)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = C.TrainState()
        accelerator.register_for_checkpointing(scheduler, state)
        batch = {"input_ids": torch.randint(1000, 2000, (args.batch, args.length)),
                 "labels": torch.randint(0, 5, (args.batch,))}
        steps, saves = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            steps.append(time.perf_counter() - start)
            state.global_step = i + 1
            start = time.perf_counter()
            folder = C.save_checkpoint(accelerator, cfg, state)
            saves.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e6:.1f}M parameters, checkpoint {size / 2 ** 20:.0f} MiB; "
              f"optimizer step (batch {args.batch} x {args.length} tokens) {statistics.median(steps):.2f} s, "
              f"checkpoint save {statistics.median(saves):.2f} s (median of {args.repeats}; "
              f"torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
