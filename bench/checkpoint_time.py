"""How long a checkpoint takes, in parts: the lead time a stop signal needs, and a projection.

    python bench/checkpoint_time.py               # the default MiniLM shape (22.7M parameters)
    python bench/checkpoint_time.py bert-base     # 110M
    python bench/checkpoint_time.py bert-large    # 335M: a 3.75 GiB checkpoint, 5 GiB of memory
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml --num_processes 2 bench/checkpoint_time.py bert-base

Builds a BERT of the chosen shape with random weights and a filled AdamW state (fp32
moments, as after a step: no backward is run, so a large shape fits in memory), then saves
it through the loop's own ``checkpoint.save_checkpoint`` (accelerate's model and optimizer
files, RNG states, train_state.json, scheduler.json, config.yaml, the manifest's sha256 of
every file, fsync, rename) ``--repeats`` times, and times the parts: the files written, the
manifest (its hashing, as now: each process its share of the files, in parallel threads) and
the fsync. The hashing is also timed as the manifest was written before: the main process,
file after file. Prints the
medians, the rates per byte, and the projection of the whole save of a 1.3B, 7B and 70B
model from those rates (see docs/reliability.md for the assumptions behind it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (layers, hidden, intermediate)
    "minilm": (6, 384, 1536),
    "bert-base": (12, 768, 3072),
    "bert-large": (24, 1024, 4096),
}
BYTES_PER_PARAMETER = 16  # fp32 weights + fp32 Adam moments (2 x 4) + 4 for the master copy or the bf16 pair


def timed(fn, seconds: list):
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    return wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", nargs="?", default="minilm", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import BertConfig, BertForSequenceClassification

    from fine_tune.core import checkpoint as C
    from fine_tune.core import outputs
    from fine_tune.core.config import TrainConfig
    from fine_tune.core.optim import build_optimizer, build_scheduler

    from accelerate.utils import broadcast_object_list

    layers, hidden, intermediate = SHAPES[args.shape]
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as mine:
        box = [mine]
        if accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)  # every process saves into the main one's folder
        tmp = box[0]
        cfg = TrainConfig(output_dir=tmp, save_total_limit=1).validate()
        model = BertForSequenceClassification(BertConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
            intermediate_size=intermediate, num_labels=5))
        optimizer = build_optimizer(model, cfg)
        for group in optimizer.param_groups:  # the state of one AdamW step, without its gradients
            for param in group["params"]:
                optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(param) * 1e-3,
                                          "exp_avg_sq": torch.rand_like(param) * 1e-6}
        scheduler = build_scheduler(optimizer, cfg, 100)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = C.TrainState()
        parts = {"manifest": [], "fsync": []}
        C.write_manifest = timed(C.write_manifest, parts["manifest"])
        C.fsync_tree = timed(outputs.fsync_tree, parts["fsync"])
        saves, serial = [], []
        for i in range(args.repeats):
            state.global_step = i + 1
            start = time.perf_counter()
            folder = C.save_checkpoint(accelerator, cfg, state, scheduler)
            saves.append(time.perf_counter() - start)
            if accelerator.is_main_process:
                start = time.perf_counter()
                for f in C._files(folder):  # as before: the main process, one file after the other
                    C._sha256(f)
                serial.append(time.perf_counter() - start)
            accelerator.wait_for_everyone()
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        n_params = sum(p.numel() for p in model.parameters())
        accelerator.wait_for_everyone()  # before the folder goes
    if not accelerator.is_main_process:
        return
    med = statistics.median
    save, manifest, fsync, hash_serial = med(saves), med(parts["manifest"]), med(parts["fsync"]), med(serial)
    write = save - manifest - fsync
    mb = size / 1e6
    print(f"{args.shape}-shaped BERT: {n_params / 1e6:.1f}M parameters, checkpoint {size / 2 ** 30:.2f} GiB; "
          f"medians of {args.repeats} saves on {accelerator.num_processes} process(es) "
          f"(torch threads {torch.get_num_threads()}):")
    print(f"  whole save {save:.2f} s = files written {write:.2f} s ({mb / write:.0f} MB/s) + manifest "
          f"{manifest:.2f} s ({mb / manifest:.0f} MB/s, parallel threads) + fsync {fsync:.2f} s")
    print(f"  hashing as before (one thread, file after file): {hash_serial:.2f} s ({mb / hash_serial:.0f} MB/s); "
          f"the save as before: {write + hash_serial + fsync:.2f} s")
    bytes_per_param = size / n_params
    print(f"  {bytes_per_param:.1f} bytes per parameter here (fp32 weights + AdamW moments); projected at "
          f"{BYTES_PER_PARAMETER} bytes per parameter, at the rates measured here:")
    for name, billions in (("1.3B", 1.3), ("7B", 7), ("70B", 70)):
        total = billions * 1e9 * BYTES_PER_PARAMETER / 1e6  # MB
        print(f"    {name}: {total / 1e3:.0f} GB, write {total / (mb / write):.0f} s + hash before "
              f"{total / (mb / hash_serial):.0f} s / now {total / (mb / manifest):.0f} s")


if __name__ == "__main__":
    main()
