"""The search file and the samplers of fine_tune.launchers.search_spec, in process (real Optuna, an
in-memory study): what a broken seeding or grid would get wrong before any trial trains."""

from __future__ import annotations

import pytest

from fine_tune.core.errors import UserError
from fine_tune.launchers.search_spec import distributions, make_sampler, sample_points, search_from_dict


def study_of(spec, asks: int) -> list[dict]:
    """Ask ``asks`` trials the way the array tasks do: one fresh sampler per trial, one shared study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage, direction=spec.direction)
    params = []
    for number in range(asks):
        study = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(spec, number))
        params.append(study.ask(distributions(spec)).params)
    return params


def test_every_trial_draws_its_own_point_from_the_same_seed():
    spec = search_from_dict({"search": {"learning_rate": {"log_uniform": [1.0e-5, 1.0e-3]},
                                        "warmup_steps": {"uniform": [0.0, 0.2]},
                                        "per_device_train_batch_size": {"int_uniform": [8, 64]}},
                             "sampler": {"name": "random", "seed": 3}}, "test")
    first = study_of(spec, 5)
    assert len({p["learning_rate"] for p in first}) == 5  # seeded alike, all five would be equal
    assert first == study_of(spec, 5)  # and the study is reproducible
    assert all(1e-5 <= p["learning_rate"] <= 1e-3 and isinstance(p["per_device_train_batch_size"], int)
               for p in first)


def test_grid_trials_cover_the_grid_once():
    spec = search_from_dict({"search": {"learning_rate": {"choice": [1.0e-3, 2.0e-3, 3.0e-3, 5.0e-3]},
                                        "lr_scheduler_type": {"choice": ["linear", "cosine"]}},
                             "sampler": {"name": "grid", "seed": 0}}, "test")
    points = study_of(spec, 8)
    assert sorted((p["learning_rate"], p["lr_scheduler_type"]) for p in points) == \
        sorted((lr, s) for lr in (1e-3, 2e-3, 3e-3, 5e-3) for s in ("linear", "cosine"))


def test_defaults_and_corners():
    spec = search_from_dict({"search": {"learning_rate": {"log_uniform": [1.0e-5, 1.0e-3]},
                                        "lr_scheduler_type": {"choice": ["linear", "cosine", "constant"]}},
                             "objective": {"metric": "f1_macro"}}, "test")
    assert (spec.metric, spec.direction, spec.trials, spec.sampler, spec.pruner) == \
        ("eval_f1_macro", "maximize", 20, {"name": "tpe", "seed": 0},
         {"name": "median", "warmup_evals": 0, "startup_trials": 5})
    assert {p["lr_scheduler_type"] for p in sample_points(spec)} == {"linear", "cosine", "constant"}
    assert {p["learning_rate"] for p in sample_points(spec)} == {1e-5, 1e-3}


@pytest.mark.parametrize("data, expect", [
    ({"search": {}}, "'search' must map train flags"),
    ({"search": {"learning_rate": [1, 2]}}, "learning_rate: give one of"),
    ({"search": {"warmup_steps": {"int_uniform": [0.5, 3]}}}, "int_uniform bounds must be integers"),
    ({"search": {"learning_rate": {"choice": [1]}}, "objective": {"direction": "up"}}, "direction 'up'"),
    ({"search": {"learning_rate": {"choice": [1]}}, "trails": 3}, "unknown keys ['trails']"),
])
def test_bad_search_files_say_what_is_wrong(data, expect):
    with pytest.raises(UserError, match=None) as err:
        search_from_dict(data, "s.yaml")
    assert expect in str(err.value) and str(err.value).startswith("--search s.yaml: ")
