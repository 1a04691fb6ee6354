"""The split of the global batch on another world size (fine_tune.core.elastic.fit_global_batch)."""

import pytest

from fine_tune.core.elastic import fit_global_batch
from fine_tune.core.errors import UserError


def test_the_same_options_keep_the_per_device_batch_and_change_the_accumulation():
    assert fit_global_batch((4, 1, 2), (4, 1), 1) == (4, 2)  # 2 processes -> 1
    assert fit_global_batch((4, 2, 1), (4, 2), 2) == (4, 1)  # 1 -> 2
    assert fit_global_batch((2, 4, 8), (2, 4), 4) == (2, 8)  # 8 GPUs -> 4


def test_asked_options_that_keep_the_global_batch_are_used():
    assert fit_global_batch((8, 1, 1), (2, 2), 2) == (2, 2)


def test_a_split_that_cannot_keep_the_per_device_batch_names_one_that_keeps_the_global_batch():
    with pytest.raises(UserError, match="use --per_device_train_batch_size 4 --gradient_accumulation_steps 1,"):
        fit_global_batch((8, 1, 1), (8, 1), 2)
    with pytest.raises(UserError, match="use --per_device_train_batch_size 3 --gradient_accumulation_steps 1,"):
        fit_global_batch((4, 3, 1), (4, 3), 4)  # a share of 3 per process


def test_other_options_that_change_the_global_batch_are_refused():
    with pytest.raises(UserError, match="is not kept by --per_device_train_batch_size 8"):
        fit_global_batch((4, 1, 2), (8, 2), 1)  # 16 on one process, not 8


def test_an_indivisible_global_batch_names_the_world_sizes_that_work():
    with pytest.raises(UserError, match="cannot be split over 3 processes; resume on 1, 2, 4, 8 processes"):
        fit_global_batch((4, 1, 2), (4, 1), 3)


def test_export_reads_safetensors_and_torch_distributed_checkpoints_exactly(tmp_path):
    """The readers of `fine-tune export`: safetensors with plain reads (every dtype the loop
    saves), and FSDP's torch distributed checkpoint as accelerate writes it ({"model": ...})."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from fine_tune.commands.export import _fsdp_tensors, _safetensors_read

    weights = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5).to(torch.bfloat16),
               "c.scale": torch.randn(2).half(), "d.empty": torch.zeros(0), "e.ids": torch.arange(6)}
    save_file(weights, tmp_path / "model.safetensors")
    read = dict(_safetensors_read(tmp_path / "model.safetensors"))
    assert sorted(read) == sorted(weights)
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in weights.items())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: torch says so
        dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "pytorch_model_fsdp_0")),
                 no_dist=True)
        read = dict(_fsdp_tensors(tmp_path / "pytorch_model_fsdp_0"))
    assert sorted(read) == sorted(weights) and all(torch.equal(read[k], v) for k, v in weights.items())
