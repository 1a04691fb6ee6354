"""Where a run trains, in words: the device, the topology and the precision, for the start line
and for ``metrics.jsonl`` (``cpu x 1, one process, mixed precision no``; ``cuda:0 NVIDIA H200 x 2,
DDP over 2 processes, mixed precision bf16 autocast``; ``... DeepSpeed ZeRO-3 over 2 processes``),
rather than accelerate's ``DistributedType.NO``."""

from __future__ import annotations

import os


def describe_device(accelerator) -> str:
    """``cuda:0 NVIDIA H200 x 2``: this process's device, times the number of processes."""
    device = accelerator.device
    name = device.type if device.type == "cpu" else str(device)  # one CPU whatever index DDP gave it
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"{name} x {accelerator.num_processes}"


def describe_topology(accelerator) -> str:
    """``one process``, ``DDP over 2 processes``, ``FSDP2 over 8 processes on 2 nodes``,
    ``DeepSpeed ZeRO-3 over 2 processes``."""
    world = accelerator.num_processes
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        stage = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        kind = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    elif getattr(state, "fsdp_plugin", None) is not None:
        kind = f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    elif world > 1:
        kind = "DDP"
    else:
        return "one process"
    text = f"{kind} over {world} process{'es' if world > 1 else ''}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = max(1, world // max(local, 1))
    return text + (f" on {nodes} nodes" if nodes > 1 else "")


def describe_precision(accelerator, mixed_precision: str) -> str:
    """``mixed precision no``, ``mixed precision bf16 autocast``, ``mixed precision fp16 autocast
    + loss scaling``; under DeepSpeed the engine itself runs in bf16/fp16."""
    if mixed_precision == "no":
        return "mixed precision no"
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return f"mixed precision {mixed_precision} (DeepSpeed)"
    return f"mixed precision {mixed_precision} autocast" + (" + loss scaling" if mixed_precision == "fp16" else "")


def describe_run(accelerator, mixed_precision: str) -> dict:
    """``{"device": ..., "topology": ..., "precision": ...}``: joined with ", " for the start line,
    and logged as they are to ``metrics.jsonl`` (one record at each start, resumed ones included)."""
    return {"device": describe_device(accelerator), "topology": describe_topology(accelerator),
            "precision": describe_precision(accelerator, mixed_precision)}
