"""The bundled DeepSpeed configs leave the ZeRO bucket sizes to accelerate, which sizes them from
the model's hidden size (hidden² elements for the reduce bucket). DeepSpeed's own defaults are
fixed: a reduce bucket of 5e8 elements, 1.9 GiB in float32 on every rank, which made ZeRO-3's
peak per rank on a 167M model 5,739 MiB instead of 3,857 (bench/large_models_memory.py)."""

import json
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "accelerate_configs").glob("ds_*.json"))
SIZED_BY_ACCELERATE = {2: ["reduce_bucket_size"],
                       3: ["reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bucket_sizes_follow_the_model(path):
    zero = json.loads(path.read_text())["zero_optimization"]
    for key in SIZED_BY_ACCELERATE[zero["stage"]]:
        assert zero.get(key) == "auto", f"{path.name}: {key} should be 'auto'"


def test_every_stage_is_covered():
    assert {json.loads(p.read_text())["zero_optimization"]["stage"] for p in CONFIGS} == {2, 3}
