"""Gradient accumulation computes the gradient of the whole optimizer step's mean loss.

61 examples with 8 per optimizer step leave a short last step (5 examples), split over the
micro-batches unevenly: a per-micro-batch mean would weight those examples wrongly, and
because Adam is invariant to a constant gradient scale only uneven batches expose that.
"""

import pytest

from conftest import load_weights, read_metrics, relative_difference, run_train, train_args

TOLERANCE = 1e-4  # of the largest weight change: what float32 reordering gives
SPLITS = ((8, 1), (4, 2), (2, 4))  # (per-device batch, accumulation): the same global batch of 8


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """One run per split, shared by the weight and the logged-loss checks (three runs, not five).
    No length grouping: the short step is the last one (grouped runs: tests/test_topologies.py)."""
    from conftest import small_files

    tmp = tmp_path_factory.mktemp("accumulation")
    files = small_files(tmp)
    outs = {}
    for bs, acc in SPLITS:
        out = outs[(bs, acc)] = tmp / f"b{bs}x{acc}"
        run_train(train_args(tiny_model, files, out, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=acc, max_steps=8, group_by_length="false"))
    return outs


def test_batch_8_equals_4x2_and_2x4(tiny_model, runs):
    finals = {key: load_weights(out / "final") for key, out in runs.items()}
    init = load_weights(tiny_model)
    ref = finals[(8, 1)]
    assert relative_difference(ref, init, init) > 0.5  # the weights did move
    for key in ((4, 2), (2, 4)):
        assert relative_difference(finals[key], ref, init) < TOLERANCE, key


def test_logged_loss_is_the_step_mean_whatever_the_accumulation(runs):
    losses = {acc: [r["loss"] for r in read_metrics(out) if "loss" in r] for (bs, acc), out in runs.items()}
    assert len(losses[1]) == 8
    for acc in (2, 4):
        for a, b in zip(losses[1], losses[acc]):
            assert abs(a - b) < 1e-4 * max(1.0, abs(a))
