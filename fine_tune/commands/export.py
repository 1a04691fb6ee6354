"""A plain model from any step checkpoint: the folder ``from_pretrained`` and ``pipeline`` load.

    fine-tune export runs/sentiment/checkpoints/step_400 runs/sentiment/step_400_model
    fine-tune export runs/lora/checkpoints/step_400 adapter_400 --adapter_only

The checkpoint may come from any topology: one process or DDP (``model.safetensors``),
DeepSpeed ZeRO-1/2/3 (``pytorch_model/``: the fp32 weights rebuilt from the ranks' partitions
by DeepSpeed's ``zero_to_fp32``), FSDP (torch distributed checkpoint, or one full state).
The output is what ``final/`` would have been at that step: the model, its config with the
label names, and the tokenizer; with LoRA the adapter merged into the base model
(``--adapter_only``: the adapter alone, for ``PeftModel.from_pretrained``).

Memory: the model is built once (the base model's weights: with LoRA the frozen ones are
needed; in a full fine-tune they are overwritten) and each checkpoint tensor is read, copied
into it and dropped in turn (safetensors and DeepSpeed's files are memory-mapped), so the
peak stays near one copy of the weights in the saved dtype (FSDP's sharded checkpoint is read
whole, as torch's ``dcp_to_torch_save`` reads it: one more copy). The checkpoint is checked against
its manifest first, and nothing in it is unpickled beyond tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fine_tune.core.config import main_guard
from fine_tune.core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fine-tune export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step checkpoint: OUTPUT_DIR/checkpoints/step_N")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--adapter_only", action="store_true",
                   help="LoRA: write the adapter alone (PeftModel.from_pretrained), not the merged model")
    return p


# ------------------------------------------------------------------ the checkpoint's weights
def checkpoint_tensors(path: Path):
    """(name, tensor) for every weight the checkpoint holds, read one at a time; names as in
    the training model's state_dict (PEFT's names with LoRA), values in the saved dtype."""
    if (path / "model.safetensors").exists():  # one process, DDP
        yield from _safetensors_read(path / "model.safetensors")
        return
    if (path / "pytorch_model").is_dir():  # DeepSpeed: accelerate's tag
        yield from _deepspeed_tensors(path)
        return
    for fsdp in (path / "pytorch_model_fsdp_0", path / "pytorch_model_fsdp.bin"):  # sharded, full state
        if fsdp.exists():
            yield from _fsdp_tensors(fsdp)
            return
    raise UserError(f"{path} holds no model weights fine_tune knows (model.safetensors, pytorch_model/, "
                    "pytorch_model_fsdp_0/)")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_read(file: Path):
    """Each tensor of a safetensors file, read into its own memory with plain reads: a memory
    map (safe_open) would keep every page it touched resident until the file is closed, a
    second copy of the weights in the process's memory."""
    import torch

    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            tensor = torch.empty(meta["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]]))
            f.seek(8 + header_size + start)
            if end > start:
                f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            yield name, tensor


def _deepspeed_tensors(path: Path):
    """ZeRO-1/2/3: the fp32 master weights gathered from every rank's optimizer partition
    (memory-mapped, one parameter at a time), cast to the dtype the engine trained in (the
    16-bit module's: what final/ holds)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from fine_tune.core.checkpoint import weights_only_loads

    with weights_only_loads(deepspeed=True):
        model_file = next((path / "pytorch_model").glob("*model_states.pt"))
        module = torch.load(model_file, map_location="cpu", mmap=True, weights_only=True).get("module") or {}
        dtypes = {k: v.dtype for k, v in module.items() if torch.is_tensor(v)}
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model",
                                                        exclude_frozen_parameters=True, lazy_mode=True)
        for name in list(lazy):
            tensor = lazy.pop(name).contiguous()
            yield name, tensor.to(dtypes.get(name, tensor.dtype))


def _fsdp_tensors(folder: Path):
    """FSDP through accelerate: a torch distributed checkpoint (SHARDED_STATE_DICT, a folder,
    read without a process group) or one full state (FULL_STATE_DICT, a file)."""
    import torch

    if folder.is_file():
        state = torch.load(folder, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    # as torch's own dcp_to_torch_save reads one (the whole state at once: one more copy)
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    model = state.get("model", state)
    for name in list(model):
        yield name, model.pop(name)


# ------------------------------------------------------------------ export
def saved_labels(path: Path) -> list[str]:
    from fine_tune.core.checkpoint import LABELS_FILE

    try:
        return json.loads((path / LABELS_FILE).read_text())["names"]
    except FileNotFoundError:
        raise UserError(f"{path} has no {LABELS_FILE}: it was written by an older version of fine_tune; "
                        "export needs the label names (use final/, or resume and save again)") from None


def export(checkpoint: Path, out: Path, adapter_only: bool = False) -> Path:
    import torch

    from fine_tune.core import checkpoint as C
    from fine_tune.core.config import config_from_dict, load_yaml
    from fine_tune.core.data import LabelInfo
    from fine_tune.core.model import load_model, load_tokenizer, save_final
    from fine_tune.core.outputs import replace_folder

    if not (checkpoint / C.STATE_FILE).exists():
        raise UserError(f"{checkpoint} is not a checkpoint (no {C.STATE_FILE}); checkpoints are "
                        "OUTPUT_DIR/checkpoints/step_N")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder")
    C.verify_manifest(checkpoint)
    cfg = config_from_dict(load_yaml(checkpoint / "config.yaml"), source=str(checkpoint / "config.yaml"))
    if adapter_only and not cfg.use_peft:
        raise UserError(f"--adapter_only: {checkpoint} is a full fine-tune (no LoRA adapter)")
    labels = LabelInfo(names=saved_labels(checkpoint))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, labels, tokenizer)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    seen = set()
    with torch.no_grad():
        for name, tensor in checkpoint_tensors(checkpoint):
            target = params.get(name, buffers.get(name))
            if target is None:
                raise UserError(f"{checkpoint} does not fit its own configuration: {name} is not a weight of "
                                f"{cfg.model_name_or_path}")
            if target.dtype != tensor.dtype:  # the saved dtype is the one to export
                target.data = torch.empty_like(target, dtype=tensor.dtype)
            target.copy_(tensor)
            seen.add(name)
            del tensor
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - seen)
    if missing:
        raise UserError(f"{checkpoint} lacks {len(missing)} trained weights (first: {missing[0]})")
    model.eval()

    def write(folder: Path) -> None:
        if adapter_only:
            model.save_pretrained(folder, save_embedding_layers=False)
        else:
            save_final(model, model.state_dict(), folder, tokenizer)  # as final/: with LoRA also adapter/

    replace_folder(out, write)
    return out


@main_guard
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = export(Path(args.checkpoint), Path(args.out), args.adapter_only)
    print(f"exported {args.checkpoint} to {out}")
