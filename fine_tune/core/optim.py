"""AdamW and the learning-rate scheduler registry.

Every scheduler here is stepped by the loop exactly once per optimizer update (the plateau
ones once per evaluation, with the metric), and is never passed to ``accelerator.prepare``:
accelerate would step it once per process (accelerate #662, #2142, #3797).
"""

from __future__ import annotations

import torch

from fine_tune.core.config import HF_SCHEDULERS, TrainConfig
from fine_tune.core.errors import UserError

PLATEAU = ("plateau", "reduce_lr_on_plateau")


def no_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Biases and normalisation weights: AdamW's weight decay would only hurt them."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name == "bias":
                names.add(full)
    return names


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    skip = no_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    # an empty group (LoRA on a model whose head has no bias) is left out: DeepSpeed's ZeRO
    # optimizers drop it, and the scheduler would then hold one learning rate too many
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optim == "adamw_torch_fused":
        # The fused kernel made the optimizer step 3x faster on a 2-core CPU (100 -> 33 ms for
        # MiniLM, fine_tune.commands.bench), the difference between trailing and matching the Trainer.
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """The scheduler named by --lr_scheduler_type, for ``total_steps`` optimizer updates."""
    name = cfg.lr_scheduler_type
    warmup = cfg.warmup_steps_for(total_steps)
    kwargs = cfg.json_field("lr_scheduler_kwargs")
    try:
        if name in PLATEAU:
            kwargs.setdefault("mode", "max" if cfg.best_is_greater else "min")
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
        if name in HF_SCHEDULERS:
            from transformers import get_scheduler

            return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                                 scheduler_specific_kwargs=kwargs or None)
        if name == "step":
            kwargs.setdefault("step_size", max(1, total_steps // 3))
            kwargs.setdefault("gamma", 0.1)
            main = torch.optim.lr_scheduler.StepLR(optimizer, **kwargs)
        elif name == "cosine_annealing":
            kwargs.setdefault("T_max", max(1, total_steps - warmup))
            main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
        else:  # pragma: no cover - the config validates names
            raise UserError(f"unknown scheduler {name!r}")
    except TypeError as e:
        raise UserError(f"--lr_scheduler_kwargs do not fit scheduler {name!r}: {e}") from None
    if warmup == 0:
        return main
    warm = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / warmup))  # as transformers: 0 at step 0
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup])


def is_plateau(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
