"""The distributed set-up: the Accelerator (CPU, GPU, DDP, FSDP, DeepSpeed) made from the run's
options and the launcher's environment, DeepSpeed's config written from our flags, and the
device facts the loop logs (peak memory, peak FLOP/s for MFU)."""

from __future__ import annotations

import os
import resource

from fine_tune.core.config import TrainConfig
from fine_tune.core.errors import UserError

KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                    "L4": 121e12, "V100": 125e12, "T4": 65e12}  # dense bf16/fp16 tensor-core peaks


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def make_accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator

    from fine_tune.core.ranks import process_group_kwargs

    use_deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED")
    has_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed and _env_true("ACCELERATE_USE_CPU"):
        raise UserError("DeepSpeed cannot be combined with use_cpu/--cpu (accelerate would silently fall back "
                        "to plain DDP); remove use_cpu from the accelerate config")
    if _env_true("ACCELERATE_USE_FSDP") and not has_gpu:
        raise UserError("FSDP through accelerate needs GPUs (accelerate's FSDP plugin finds no device on CPU); "
                        "on CPU use accelerate_configs/cpu_ddp.yaml or a DeepSpeed ZeRO config")
    if cfg.mixed_precision == "fp16" and not has_gpu:
        raise UserError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 (or no)")
    # gloo is the CPU backend; without it accelerate and DeepSpeed disagree on the world size.
    # --ddp_timeout bounds every collective: a process that died or hangs ends the run.
    handlers = [process_group_kwargs(cfg, backend="gloo" if not has_gpu and world > 1 else None)]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=not has_gpu and not use_deepspeed,
        # no log_with: the trackers are ours (fine_tune.core.tracking), appended to accelerator.trackers
        kwargs_handlers=handlers,
    )
    seen = accelerator.num_processes
    expected = cfg.expected_world_size or world
    if seen != expected:
        raise UserError(f"the launcher asked for {expected} processes but this process sees a world of {seen}; "
                        "on CPU use accelerate_configs/cpu_ddp.yaml (MULTI_CPU and --cpu start one process)")
    return accelerator


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Our flags are the one source of truth: write them into DeepSpeed's config before prepare."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * \
        accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {**(ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}),
                  "enabled": cfg.mixed_precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else ZeRO-3 saves empty weights


def peak_memory_mb() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def device_peak_flops(cfg: TrainConfig):
    import torch

    if cfg.peak_flops:
        return cfg.peak_flops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)
    return None


def stop_requested_anywhere(stop, accelerator) -> bool:
    """Whether any process got a stop signal (all-reduced, so all processes answer alike)."""
    if accelerator.num_processes == 1:
        return stop.requested
    import torch

    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")[0]) > 0
