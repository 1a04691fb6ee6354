"""FSDP's units: which module classes get their own ``fully_shard`` (FSDP2) or FSDP wrap.

accelerate's ``fsdp2_prepare_model`` (accelerate 1.15, ``utils/fsdp_utils.py``) shards every
instance of the classes named in the model's ``_no_split_modules``, then calls ``fully_shard``
again on ``get_input_embeddings()`` (and puts the final norm and the output embeddings in a
"tail" unit). For BERT and RoBERTa ``_no_split_modules`` names the embeddings module too
(``BertEmbeddings``), so the word embeddings are sharded twice and the second ``fully_shard``
fails on a weight that is already a DTensor (``TypeError: Invariant encountered: value was None
when it should not be`` in ``DeviceMesh._concatenate``). DeBERTa-v2 and ELECTRA name nothing,
so their layers would share one unit with the whole model.

The rule here: the units are the repeated transformer blocks only, never a module that holds
the input or output embeddings; accelerate's own embedding and tail units (tied embeddings in
one of them) then own the rest, and the root unit whatever is left (pooler, task head).
"""

from __future__ import annotations


def _base(model):
    """The transformers model inside a peft wrapper (LoRA keeps the block classes)."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _embedding_modules(model) -> list:
    base = _base(model)
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(base, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            found.append(module)
    return found


def _repeated_block_classes(model) -> set[type]:
    """Classes of the blocks a model repeats: the elements of a ``ModuleList`` that holds two or
    more modules of one class (BERT's ``encoder.layer``, Llama's ``model.layers``)."""
    import torch

    classes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                classes |= kinds
    return classes


def fsdp_unit_classes(model) -> list[str]:
    """Names of the module classes to shard as FSDP units (sorted): the model's repeated
    transformer block classes that ``_no_split_modules`` names, or, where it names none of them
    (DeBERTa-v2, ELECTRA in transformers 5), every repeated block class; never a class one of
    whose instances holds the input or output embeddings, and never a class nested inside
    another chosen one (each module is sharded once)."""
    base = _base(model)
    embeddings = _embedding_modules(model)

    def holds_embeddings(module) -> bool:
        return any(e is sub for sub in module.modules() for e in embeddings)

    present: dict[str, type] = {}
    for module in model.modules():
        present.setdefault(type(module).__name__, type(module))
    repeated = _repeated_block_classes(model)
    named = {present[n] for n in (getattr(base, "_no_split_modules", None) or ()) if n in present}
    chosen = (named & repeated) or repeated
    chosen = {cls for cls in chosen
              if not any(holds_embeddings(m) for m in model.modules() if isinstance(m, cls))}
    # outermost only: a chosen class inside an instance of another chosen class is dropped
    nested = {cls for cls in chosen for m in model.modules()
              if type(m) in chosen and type(m) is not cls and any(isinstance(s, cls) for s in m.modules())}
    return sorted(cls.__name__ for cls in chosen - nested)


def configure_fsdp(accelerator, model) -> None:
    """Before ``accelerator.prepare``: tell accelerate's FSDP plugin which classes to shard (see
    the module docstring). A class list the accelerate config names itself
    (``fsdp_transformer_layer_cls_to_wrap``) is kept as given."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return  # size-based or no auto wrap: the user chose something else
    units = fsdp_unit_classes(model)
    if units:
        plugin.transformer_cls_names_to_wrap = units
