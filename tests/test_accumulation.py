"""Gradient accumulation computes the gradient of the whole optimizer step's mean loss.

61 examples with 8 per optimizer step leave a short last step (5 examples), split over the
micro-batches unevenly: a per-micro-batch mean would weight those examples wrongly, and
because Adam is invariant to a constant gradient scale only uneven batches expose that.
"""

from conftest import load_weights, relative_difference, run_train, train_args

TOLERANCE = 1e-4  # of the largest weight change: what float32 reordering gives


def test_batch_8_equals_4x2_and_2x4(tiny_model, data_files, tmp_path):
    finals = {}
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"b{bs}x{acc}"
        run_train(train_args(tiny_model, data_files, out, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=acc, max_steps=8, group_by_length="false"))
        finals[(bs, acc)] = load_weights(out / "final")
    init = load_weights(tiny_model)
    ref = finals[(8, 1)]
    assert relative_difference(ref, init, init) > 0.5  # the weights did move
    for key in ((4, 2), (2, 4)):
        assert relative_difference(finals[key], ref, init) < TOLERANCE, key


def test_logged_loss_is_the_step_mean_whatever_the_accumulation(tiny_model, data_files, tmp_path):
    from conftest import read_metrics

    losses = {}
    for bs, acc in ((8, 1), (2, 4)):
        out = tmp_path / f"b{bs}x{acc}"
        run_train(train_args(tiny_model, data_files, out, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=acc, max_steps=8))
        losses[acc] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses[1]) == 8
    for a, b in zip(losses[1], losses[4]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))
