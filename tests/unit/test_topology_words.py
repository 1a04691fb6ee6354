"""The start line's words for device, topology and precision (fine_tune.core.topology), for the
cases a CPU cannot launch: a named GPU, FSDP2, DeepSpeed, several nodes, fp16."""

import types

import pytest
import torch

from fine_tune.core.topology import describe_run


def fake(device="cpu:0", world=1, deepspeed_stage=None, fsdp_version=None):
    ds = None if deepspeed_stage is None else types.SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": deepspeed_stage}})
    fsdp = None if fsdp_version is None else types.SimpleNamespace(fsdp_version=fsdp_version)
    return types.SimpleNamespace(device=torch.device(device), num_processes=world,
                                 state=types.SimpleNamespace(deepspeed_plugin=ds, fsdp_plugin=fsdp))


def test_one_cpu_process():
    assert ", ".join(describe_run(fake(), "no").values()) == "cpu x 1, one process, mixed precision no"


def test_gpu_ddp_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    where = describe_run(fake("cuda:0", 2), "bf16")
    assert ", ".join(where.values()) == "cuda:0 NVIDIA H200 x 2, DDP over 2 processes, mixed precision bf16 autocast"


@pytest.mark.parametrize("kwargs, precision, expected", [
    ({"deepspeed_stage": 3}, "bf16", "DeepSpeed ZeRO-3 over 2 processes, mixed precision bf16 (DeepSpeed)"),
    ({"fsdp_version": 2}, "fp16", "FSDP2 over 2 processes, mixed precision fp16 autocast + loss scaling"),
])
def test_sharded(kwargs, precision, expected, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    where = describe_run(fake(world=2, **kwargs), precision)
    assert f"{where['topology']}, {where['precision']}" == expected


def test_nodes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert describe_run(fake(world=8), "no")["topology"] == "DDP over 8 processes on 2 nodes"
