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
