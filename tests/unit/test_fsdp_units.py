"""FSDP2's units (fine_tune.core.fsdp): the repeated transformer blocks only, so that no module is
sharded twice. Each model family is built from a tiny config, full and with LoRA, and then put
through accelerate's own ``fsdp2_prepare_model`` on CPU (a one-process gloo group: FSDP2 itself
runs on CPU; only accelerate's launcher path needs GPUs), followed by a forward and backward."""

from __future__ import annotations

import socket
import types

import pytest

FAMILIES = {  # family -> (config class, model class stem, expected block class)
    "bert": ("BertConfig", "Bert", "BertLayer"),
    "roberta": ("RobertaConfig", "Roberta", "RobertaLayer"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2", "DebertaV2Layer"),
    "electra": ("ElectraConfig", "Electra", "ElectraLayer"),
    "llama": ("LlamaConfig", "Llama", "LlamaDecoderLayer"),
    "qwen2": ("Qwen2Config", "Qwen2", "Qwen2DecoderLayer"),
    "mistral": ("MistralConfig", "Mistral", "MistralDecoderLayer"),
}


def build(family: str, lora: bool, head: str = "ForSequenceClassification", **overrides):
    import torch
    import transformers

    config_name, stem, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0, **overrides)
    model = getattr(transformers, stem + head)(config)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules="all-linear"))
    return model


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fsdp2_prepare(model, names):
    """accelerate's FSDP2 preparation, as ``accelerator.prepare`` runs it, with ``names`` as the
    plugin's classes to wrap (None: accelerate's default, the model's ``_no_split_modules``)."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            cpu_ram_efficient_loading=False)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                        mixed_precision="no", is_main_process=True, device=torch.device("cpu"))
    from fine_tune.core.fsdp import configure_fsdp

    if names is None:
        configure_fsdp(accelerator, model)
    else:
        plugin.transformer_cls_names_to_wrap = names
    return fsdp2_prepare_model(accelerator, model)


def sharded_units(model) -> dict[str, int]:
    from torch.distributed.fsdp import FSDPModule

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            name = type(module).__name__.removeprefix("FSDP")
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_units_are_the_repeated_blocks_and_fsdp2_prepares(family, lora, process_group):
    import torch

    from fine_tune.core.fsdp import fsdp_unit_classes

    model = build(family, lora)
    block = FAMILIES[family][2]
    assert fsdp_unit_classes(model) == [block]
    prepared = fsdp2_prepare(model, None)
    units = sharded_units(prepared)
    assert units.get(block) == 2, units  # one unit per layer
    assert not any("Embeddings" in name for name in units), units  # the embeddings module holds no unit of its own
    out = prepared(input_ids=torch.randint(1, 64, (2, 8)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None for p in prepared.parameters() if p.requires_grad)


def test_accelerate_default_units_shard_bert_embeddings_twice(process_group):
    """What the unit choice avoids: accelerate's default (_no_split_modules names BertEmbeddings)
    fails in fully_shard on the already-sharded word embeddings, as it did on the H200."""
    from fine_tune.core.fsdp import _base

    model = build("bert", lora=False)
    assert "BertEmbeddings" in _base(model)._no_split_modules
    with pytest.raises(TypeError, match="Invariant encountered"):
        fsdp2_prepare(model, sorted(_base(model)._no_split_modules))


def test_tied_embeddings_stay_in_one_unit(process_group):
    """A causal LM whose output layer shares the input embeddings: no block holds either, and
    after FSDP2 the two are still one parameter."""
    import torch

    from fine_tune.core.fsdp import fsdp_unit_classes

    model = build("llama", lora=False, head="ForCausalLM", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert fsdp_unit_classes(model) == ["LlamaDecoderLayer"]
    prepared = fsdp2_prepare(model, None)
    assert prepared.lm_head.weight is prepared.model.embed_tokens.weight
    ids = torch.randint(1, 64, (2, 8))
    prepared(input_ids=ids, labels=ids).loss.backward()


def test_names_from_the_accelerate_config_are_kept():
    from accelerate.utils import FullyShardedDataParallelPlugin

    from fine_tune.core.fsdp import configure_fsdp

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["BertLayer", "BertPooler"],
                                            cpu_ram_efficient_loading=False)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    configure_fsdp(accelerator, build("bert", lora=False))
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer", "BertPooler"]
    no_fsdp = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=None))
    configure_fsdp(no_fsdp, build("bert", lora=False))  # DDP, DeepSpeed: nothing to do
