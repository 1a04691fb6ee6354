"""Each scheduler family gives the expected learning rate at each optimizer step, stepped once
per update (never once per process), and the registry matches transformers' names."""

import math

import pytest
import torch

from fine_tune.core.config import HF_SCHEDULERS, parse_args
from fine_tune.core.optim import build_optimizer, build_scheduler, no_decay_parameter_names


def lrs(name: str, steps: int = 10, **flags) -> list[float]:
    args = ["--lr_scheduler_type", name, "--learning_rate", "1.0"]
    for k, v in flags.items():
        args += [f"--{k}", str(v)]
    cfg = parse_args(args)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_registry_matches_transformers():
    from transformers.trainer_utils import SchedulerType

    assert set(HF_SCHEDULERS) == {s.value for s in SchedulerType}


def test_linear_with_warmup_ratio():
    got = lrs("linear", 10, warmup_steps=0.2)  # 2 warm-up steps
    want = [0.0, 0.5] + [(10 - s) / 8 for s in range(2, 10)]
    assert got == pytest.approx(want)


def test_cosine_and_constant_with_warmup():
    got = lrs("cosine", 10, warmup_steps=2)
    want = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert got == pytest.approx(want)
    assert lrs("constant_with_warmup", 6, warmup_ratio=0.5) == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])


def test_polynomial_and_restarts_run_from_transformers():
    got = lrs("polynomial", 10, lr_scheduler_kwargs='{"power": 2.0, "lr_end": 0.0}')
    assert got[0] == pytest.approx(1.0) and got[5] == pytest.approx(0.25)
    got = lrs("cosine_with_restarts", 10, lr_scheduler_kwargs='{"num_cycles": 2}')
    assert got[0] == pytest.approx(1.0) and got[5] == pytest.approx(1.0)  # second cycle restarts


def test_torch_step_and_cosine_annealing():
    assert lrs("step", 6, lr_scheduler_kwargs='{"step_size": 2, "gamma": 0.5}') == \
        pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    got = lrs("cosine_annealing", 5)
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)])
    got = lrs("step", 6, warmup_steps=2, lr_scheduler_kwargs='{"step_size": 2, "gamma": 0.5}')
    assert got == pytest.approx([0, 0.5, 1, 1, 0.5, 0.5])


def test_plateau_steps_on_the_metric():
    cfg = parse_args(["--lr_scheduler_type", "plateau", "--learning_rate", "1.0",
                      "--lr_scheduler_kwargs", '{"patience": 1, "factor": 0.5}'])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 100)
    assert sched.mode == "max"  # default metric: accuracy, greater is better
    for acc in (0.5, 0.6, 0.6, 0.6):
        sched.step(acc)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_no_weight_decay_on_bias_and_layernorm():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=100))
    skip = no_decay_parameter_names(model)
    assert "bert.embeddings.LayerNorm.weight" in skip and "classifier.bias" in skip
    assert "classifier.weight" not in skip and "bert.encoder.layer.0.attention.self.query.weight" not in skip
    opt = build_optimizer(model, parse_args(["--weight_decay", "0.1"]))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(id(p) not in decayed for n, p in model.named_parameters() if n in skip)


@pytest.mark.parametrize("flags", [{"warmup_steps": 3}, {"warmup_steps": 0.3}, {"warmup_ratio": 0.25}],
                         ids=["int", "float-ratio", "warmup_ratio"])
def test_linear_warmup_as_a_count_or_a_ratio(flags):
    # 3 warm-up steps each time: 3, ceil(0.3 x 10), ceil(0.25 x 10)
    want = [0.0, 1 / 3, 2 / 3] + [(10 - s) / 7 for s in range(3, 10)]
    assert lrs("linear", 10, **flags) == pytest.approx(want)


def test_cosine_with_warmup_ratio():
    got = lrs("cosine", 10, warmup_ratio=0.2)
    want = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert got == pytest.approx(want)


def test_torch_schedulers_after_a_warmup_ratio():
    # the step schedule counts its steps from the end of the warm-up
    assert lrs("step", 8, warmup_ratio=0.25, lr_scheduler_kwargs='{"step_size": 2, "gamma": 0.5}') == \
        pytest.approx([0, 0.5, 1, 1, 0.5, 0.5, 0.25, 0.25])
    # default step_size: a third of all steps; cosine annealing spans the steps after warm-up
    assert lrs("step", 9) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    got = lrs("cosine_annealing", 8, warmup_steps=3)
    assert got == pytest.approx([0, 1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)])


def test_plateau_mode_follows_the_best_metric_and_lowers_the_rate_step_by_step():
    cfg = parse_args(["--lr_scheduler_type", "reduce_lr_on_plateau", "--learning_rate", "1.0",
                      "--metric_for_best_model", "loss", "--lr_scheduler_kwargs", '{"patience": 0, "factor": 0.5}'])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 100)
    assert sched.mode == "min"  # a loss: lower is better
    seen = []
    for loss in (1.0, 0.8, 0.9, 0.9, 0.5, 0.6):
        sched.step(loss)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1, 1, 0.5, 0.25, 0.25, 0.125])


@pytest.mark.parametrize("name,flags", [("linear", {"warmup_steps": 2}), ("cosine", {"warmup_ratio": 0.3}),
                                        ("step", {"warmup_steps": 2}), ("cosine_annealing", {"warmup_steps": 3})])
def test_a_resumed_scheduler_continues_the_same_sequence(name, flags):
    """The checkpoint holds the optimizer's and the scheduler's state_dict; a fresh pair that
    loads them at step 4 must give the rest of the uninterrupted sequence."""
    want = lrs(name, 10, **flags)
    args = ["--lr_scheduler_type", name, "--learning_rate", "1.0"]
    for k, v in flags.items():
        args += [f"--{k}", str(v)]
    cfg = parse_args(args)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    got = []
    for _ in range(6):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(want[4:])
    assert len(set(want[4:])) > 1  # the sequence moves: a scheduler that restarted would differ


def test_warmup_steps_for_rounds_a_ratio_up_and_keeps_a_count():
    assert parse_args(["--warmup_steps", "0.1"]).warmup_steps_for(15) == 2  # ceil(1.5)
    assert parse_args(["--warmup_ratio", "0.01"]).warmup_steps_for(15) == 1  # never 0 for a ratio > 0
    assert parse_args(["--warmup_steps", "5.0"]).warmup_steps_for(15) == 5  # 5.0 is a count, not a ratio
    assert parse_args(["--warmup_steps", "0"]).warmup_steps_for(15) == 0
    assert parse_args([]).warmup_steps_for(15) == 0


def test_bad_scheduler_kwargs_are_a_user_error():
    from fine_tune.core.errors import UserError

    with pytest.raises(UserError, match="--lr_scheduler_kwargs do not fit scheduler 'step'"):
        lrs("step", 4, lr_scheduler_kwargs='{"step_sizes": 2}')
