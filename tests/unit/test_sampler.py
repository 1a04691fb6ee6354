"""StepSampler and StepLoader: how each epoch is cut into optimizer steps and dealt to ranks
and micro-batches. Every rank is simulated in this one process by a sampler with its own
``rank``; the real multi-process runs are in tests/test_topologies.py."""

from collections import Counter

import numpy as np
import pytest
import torch

from fine_tune.core.data import StepLoader, StepSampler

# (examples, micro_batch, accumulation, world): even and uneven splits, a short last step,
# ranks that get no example of a micro-step, more ranks than examples in the last step
TOPOLOGIES = [(61, 8, 1, 1), (61, 4, 2, 1), (61, 4, 1, 2), (61, 2, 2, 2), (61, 1, 4, 2),
              (50, 3, 2, 3), (9, 2, 2, 2), (7, 1, 2, 3), (40, 5, 1, 4), (13, 16, 1, 1)]


def lengths_for(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 120, n)


def samplers(n, micro, acc, world, seed=7, group=False, n_units=None, lengths=None):
    lengths = lengths_for(n) if lengths is None else lengths
    n_units = np.ones(n, dtype=int) if n_units is None else n_units
    return [StepSampler(lengths, n_units, micro, acc, world, rank, seed, group) for rank in range(world)]


def as_sets(steps) -> set:
    return {frozenset(s.tolist()) for s in steps}


def dealt(ranks: list[StepSampler], step: np.ndarray) -> list[list[list[int]]]:
    """[rank][micro-step] -> indices, for one optimizer step."""
    return [s.micro_batches(step) for s in ranks]


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("n,micro,acc,world", TOPOLOGIES)
def test_each_step_is_dealt_completely_once_and_evenly(n, micro, acc, world, group):
    ranks = samplers(n, micro, acc, world, group=group)
    g = micro * acc * world
    for epoch in range(3):
        steps = ranks[0].epoch_steps(epoch)
        assert len(steps) == len(ranks[0]) == -(-n // g)
        # every example exactly once per epoch (a sampler that drops or repeats one fails here)
        assert sorted(int(i) for s in steps for i in s) == list(range(n))
        sizes = [len(s) for s in steps]
        assert all(0 < k <= g for k in sizes) and sum(k < g for k in sizes) == (1 if n % g else 0)
        if not group:  # without grouping the short step is the last one
            assert sizes[:-1] == [g] * (len(steps) - 1)
        for step in steps:
            per_rank = dealt(ranks, step)
            micro_steps = -(-len(step) // (micro * world))
            assert micro_steps <= acc
            # every rank runs the same number of forward/backward passes (collectives stay matched)
            assert [len(r) for r in per_rank] == [micro_steps] * world
            real = Counter()
            for j in range(micro_steps):
                batches = [r[j] for r in per_rank]
                in_micro = step[j * micro * world:(j + 1) * micro * world]
                counts = []
                for b in batches:
                    assert 1 <= len(b) <= micro
                    if b[0] < 0:  # a weight-0 stand-in: alone, and a copy of a real example of this micro-step
                        assert len(b) == 1 and -b[0] - 1 in set(in_micro.tolist())
                        counts.append(0)
                    else:
                        assert all(i >= 0 for i in b)
                        counts.append(len(b))
                        real.update(b)
                assert max(counts) - min(counts) <= 1  # as even as possible over the ranks
                assert sum(counts) == len(in_micro)
            assert real == Counter(step.tolist())  # each example of the step on exactly one rank, once


def test_short_last_step_by_hand():
    """9 examples, 2 ranks x 2 micro x 2 accumulation: a full step of 8, then one example,
    which rank 0 trains on while rank 1 runs a weight-0 copy of it."""
    r0, r1 = samplers(9, micro=2, acc=2, world=2)
    full, short = r0.epoch_steps(0)
    a, b, c, d, e, f, g, h = full.tolist()
    assert r0.micro_batches(full) == [[a, b], [e, f]] and r1.micro_batches(full) == [[c, d], [g, h]]
    (x,) = short.tolist()
    assert r0.micro_batches(short) == [[x]] and r1.micro_batches(short) == [[-(x + 1)]]
    # 3 ranks, one example left: ranks 1 and 2 both run stand-ins
    ranks = samplers(7, micro=1, acc=2, world=3)
    (y,) = ranks[0].epoch_steps(0)[-1].tolist()
    assert dealt(ranks, ranks[0].epoch_steps(0)[-1]) == [[[y]], [[-(y + 1)]], [[-(y + 1)]]]


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
def test_every_rank_and_every_topology_sees_the_same_steps(group):
    """The steps depend on (seed, epoch, global batch) only: 8 x 1 x 1, 4 x 2 x 1, 4 x 1 x 2,
    2 x 2 x 2 and 1 x 4 x 2 train on the same examples in every optimizer step."""
    reference = samplers(61, 8, 1, 1, group=group)[0]
    for micro, acc, world in [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (1, 8, 1)]:
        for s in samplers(61, micro, acc, world, group=group):
            for epoch in range(3):
                got, want = s.epoch_steps(epoch), reference.epoch_steps(epoch)
                assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
def test_order_changes_with_epoch_and_seed_and_nothing_else(group):
    s = samplers(200, 4, 1, 1, group=group)[0]
    e0, e1 = s.epoch_steps(0), s.epoch_steps(1)
    assert as_sets(e0) != as_sets(e1), "each epoch must be shuffled anew"
    other_seed = samplers(200, 4, 1, 1, seed=8, group=group)[0]
    assert as_sets(other_seed.epoch_steps(0)) != as_sets(e0)
    # no dependence on global RNG state or on earlier calls
    np.random.seed(123)
    torch.manual_seed(123)
    again = samplers(200, 4, 1, 1, group=group)[0]
    again.epoch_steps(5)
    assert all(np.array_equal(a, b) for a, b in zip(again.epoch_steps(0), e0))


def test_length_grouping_batches_similar_lengths_in_shuffled_order():
    n, g = 4000, 8  # 500 steps, about 31 mega-batches of 16 steps
    lengths = lengths_for(n, seed=3)
    grouped = samplers(n, g, 1, 1, group=True, lengths=lengths)[0]
    plain = samplers(n, g, 1, 1, group=False, lengths=lengths)[0]

    def spread(steps):  # the padding a step wastes grows with it
        return np.mean([np.ptp(lengths[s]) for s in steps])

    # grouped steps hold much closer lengths than random ones
    assert spread(grouped.epoch_steps(0)) < 0.25 * spread(plain.epoch_steps(0))
    # ... yet the steps come in random order: not longest first, not one sorted run per mega-batch
    means = np.array([lengths[s].mean() for s in grouped.epoch_steps(0)])
    assert means[0] != means.max()
    descents = np.sum(np.diff(means) < 0)
    assert 0.3 < descents / (len(means) - 1) < 0.7  # a sorted order would give ~1.0
    # and different steps in each epoch
    sets = [as_sets(grouped.epoch_steps(e)) for e in (0, 1)]
    assert len(sets[0] & sets[1]) < 0.1 * len(sets[0])


def test_units_are_those_of_the_whole_step_over_all_ranks():
    n_units = np.random.default_rng(1).integers(0, 9, 61)  # e.g. labelled tokens per sentence
    ranks = samplers(61, 2, 2, 2, n_units=n_units)
    steps = ranks[0].epoch_steps(0)
    for step in steps:
        want = int(sum(n_units[i] for i in step))
        assert all(r.units(step) == want for r in ranks)
        # the stand-ins add nothing: units count real examples only
        dealt_units = sum(n_units[i] for r in dealt(ranks, step) for b in r for i in b if i >= 0)
        assert dealt_units == want
    assert sum(ranks[0].units(s) for s in steps) == n_units.sum()
    assert sum(ranks[0].tokens(s) for s in steps) == ranks[0].lengths.sum()


# ------------------------------------------------------------------ StepLoader
def dataset(n: int) -> list[dict]:
    return [{"id": i, "n_units": 1, "length": 3} for i in range(n)]


def collate(features: list[dict]) -> dict:
    """Keep what the loop relies on: which examples, with which weight."""
    return {"ids": [f["id"] for f in features], "weight": [f.get("weight", 1.0) for f in features]}


def loader(n, micro, acc, world, rank, seed=7, group=False, num_workers=0):
    s = StepSampler(lengths_for(n), np.ones(n, dtype=int), micro, acc, world, rank, seed, group)
    return StepLoader(dataset(n), s, collate, num_workers=num_workers)


def flatten(step_batches) -> list:
    return [(b.units, b.examples, b.tokens, [(mb["ids"], mb["weight"]) for mb in b.micro_batches])
            for b in step_batches]


def test_loader_batches_carry_weight_zero_for_stand_ins():
    steps = list(loader(9, 2, 2, 2, rank=1).iterate(0))
    assert [b.examples for b in steps] == [8, 1] and [b.units for b in steps] == [8, 1]
    (stand_in,) = steps[1].micro_batches
    assert stand_in["weight"] == [0.0] and len(stand_in["ids"]) == 1
    assert all(w == 1.0 for b in steps[0].micro_batches for w in b["weight"])
    (real,) = list(loader(9, 2, 2, 2, rank=0).iterate(0))[1].micro_batches
    assert real == {"ids": stand_in["ids"], "weight": [1.0]}


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("epoch,start", [(0, 0), (0, 3), (1, 5), (2, 7)])
def test_resume_position_gives_the_remaining_steps(epoch, start, group):
    """A resumed run builds a fresh loader and iterates from (epoch, step_in_epoch): it must
    get exactly the steps the uninterrupted run had left, on every rank."""
    for rank in range(2):
        uninterrupted = loader(61, 2, 2, 2, rank, group=group)
        for e in range(epoch):  # the uninterrupted run went through the earlier epochs first
            list(uninterrupted.iterate(e))
        full = flatten(uninterrupted.iterate(epoch))
        np.random.seed(99)
        torch.manual_seed(99)  # a resumed process starts with other global RNG states
        resumed = flatten(loader(61, 2, 2, 2, rank, group=group).iterate(epoch, start))
        assert len(full) == 8 and resumed == full[start:]
    # and the resumed part is not just any 8 - start steps: other epochs differ
    assert flatten(loader(61, 2, 2, 2, 0, group=group).iterate(epoch + 1, start)) != resumed


def test_worker_processes_give_the_same_batches():
    assert flatten(loader(61, 2, 2, 2, 1, num_workers=2).iterate(1, 2)) == \
        flatten(loader(61, 2, 2, 2, 1).iterate(1, 2))
