"""The search file (slurm/searches/*.yaml) of ``fine-tune submit --search``: read, checked, and
turned into Optuna's distributions, sampler and pruner. Checked with the train flags before
anything is submitted (:func:`check_search`); the study itself is fine_tune.launchers.search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fine_tune.core.config import ConfigError, parse_args
from fine_tune.core.errors import UserError
from fine_tune.launchers.sweeps import has_flag, point_flags

DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")


@dataclass
class SearchSpec:
    """A search file (slurm/searches/*.yaml), checked."""
    space: dict  # train flag -> {distribution: arguments}
    metric: str = "eval_accuracy"
    direction: str = "maximize"
    trials: int = 20
    sampler: dict = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    name: str = "search"

    def to_dict(self) -> dict:
        return {"search": self.space, "objective": {"metric": self.metric, "direction": self.direction},
                "trials": self.trials, "sampler": self.sampler, "pruner": self.pruner, "name": self.name}


def load_search(path: str | os.PathLike) -> SearchSpec:
    from fine_tune.core.config import load_yaml

    data = load_yaml(path, "--search", mapping=False)  # search_from_dict says what a search file holds
    return search_from_dict(data, str(path), default_name=Path(path).stem)


def search_from_dict(data: Any, where: str, default_name: str = "search") -> SearchSpec:
    def bad(message: str):
        raise UserError(f"--search {where}: {message}")

    if not isinstance(data, dict):
        bad("expected a mapping with 'search', 'objective', 'trials', 'sampler', 'pruner'")
    unknown = set(data) - {"search", "objective", "trials", "sampler", "pruner", "name"}
    if unknown:
        bad(f"unknown keys {sorted(unknown)}; expected search, objective, trials, sampler, pruner, name")
    space = data.get("search")
    if not isinstance(space, dict) or not space:
        bad("'search' must map train flags to distributions, e.g. learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}")
    for key, spec in space.items():
        kind, args = (next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else (None, None))
        if kind not in DISTRIBUTIONS:
            bad(f"{key}: give one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
        if kind == "choice":
            if not isinstance(args, list) or not args:
                bad(f"{key}: choice needs a non-empty list of values")
        elif not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                  and args[0] < args[1]):
            bad(f"{key}: {kind} needs [low, high] with low < high")
        elif kind == "log_uniform" and args[0] <= 0:
            bad(f"{key}: log_uniform bounds must be > 0")
        elif kind == "int_uniform" and not all(float(a).is_integer() for a in args):
            bad(f"{key}: int_uniform bounds must be integers")
    objective = data.get("objective") or {}
    if not isinstance(objective, dict) or set(objective) - {"metric", "direction"}:
        bad("'objective' must be {metric: eval_accuracy, direction: maximize}")
    metric = str(objective.get("metric", "eval_accuracy"))
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        bad(f"objective direction {direction!r}: use maximize or minimize")
    trials = data.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        bad(f"trials must be a positive integer, not {trials!r}")
    sampler = data.get("sampler") or {}
    sampler = {"name": sampler} if isinstance(sampler, str) else sampler
    if not isinstance(sampler, dict) or sampler.get("name", "tpe") not in SAMPLERS or set(sampler) - {"name", "seed"}:
        bad(f"sampler must be {{name: {'|'.join(SAMPLERS)}, seed: N}}")
    sampler = {"name": sampler.get("name", "tpe"), "seed": int(sampler.get("seed", 0))}
    if sampler["name"] == "grid" and any(next(iter(s)) not in ("choice", "int_uniform") for s in space.values()):
        bad("the grid sampler needs choice (or int_uniform) entries only")
    pruner = data.get("pruner") or {}
    pruner = {"name": pruner} if isinstance(pruner, str) else pruner
    if not isinstance(pruner, dict) or pruner.get("name", "median") not in PRUNERS \
            or set(pruner) - {"name", "warmup_evals", "startup_trials"}:
        bad(f"pruner must be {{name: {'|'.join(PRUNERS)}, warmup_evals: N, startup_trials: N}}")
    pruner = {"name": pruner.get("name", "median"), "warmup_evals": int(pruner.get("warmup_evals", 0)),
              "startup_trials": int(pruner.get("startup_trials", 5))}
    return SearchSpec(space=space, metric=metric, direction=direction, trials=trials, sampler=sampler,
                      pruner=pruner, name=str(data.get("name") or default_name))


def distributions(spec: SearchSpec) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, entry in spec.space.items():
        (kind, args), = entry.items()
        if kind == "choice":
            out[key] = CategoricalDistribution(args)
        elif kind == "int_uniform":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        else:
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "log_uniform")
    return out


def sample_points(spec: SearchSpec) -> list[dict]:
    """The corners of the space, to check that every value makes valid train flags before submitting."""
    lows, highs = {}, {}
    for key, entry in spec.space.items():
        (kind, args), = entry.items()
        values = args if kind == "choice" else [int(a) if kind == "int_uniform" else float(a) for a in args]
        lows[key], highs[key] = values[0], values[-1]
    points = [lows, highs]
    for key, entry in spec.space.items():
        (kind, args), = entry.items()
        if kind == "choice":
            points += [{**lows, key: v} for v in args[1:-1]]
    return points


def make_sampler(spec: SearchSpec, offset: int):
    """The sampler for the trial asked as number ``offset``. Each task builds its own sampler:
    seeded alike, every task would draw the same first point, so the seed moves on by trial.
    Not for the grid: its seed shuffles the grid's order, which every task must share (it picks
    a point no other trial holds, from the study)."""
    import optuna

    seed = spec.sampler["seed"] + offset
    if spec.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler["name"] == "grid":
        grid = {}
        for key, entry in spec.space.items():
            (kind, args), = entry.items()
            grid[key] = list(args) if kind == "choice" else list(range(int(args[0]), int(args[1]) + 1))
        return optuna.samplers.GridSampler(grid, seed=spec.sampler["seed"])
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SearchSpec):
    import optuna

    if spec.pruner["name"] == "none":
        return optuna.pruners.NopPruner()
    # evaluations are numbered from 1 and Optuna prunes from step n_warmup_steps on: the first
    # warmup_evals evaluations are never pruned
    return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner["startup_trials"],
                                       n_warmup_steps=spec.pruner["warmup_evals"] + 1)


def check_search(path: str, train: list[str], output_dir: Path) -> SearchSpec:
    """The search file, checked with the train flags before anything is submitted."""
    spec = load_search(path)
    if has_flag(train, "eval_hook"):
        raise UserError("--eval_hook is set per trial by --search; leave it out")
    for key in spec.space:
        if has_flag(train, key):
            raise UserError(f"--{key} is searched ({path}); leave it out of the train flags")
    for point in sample_points(spec):
        try:
            parse_args([*train, *point_flags(point), "--output_dir", str(output_dir / "trial_0")])
        except ConfigError as e:
            raise UserError(f"search {path}: {e}") from None
    return spec
