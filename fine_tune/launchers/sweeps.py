"""Sweeps: a sweep file (slurm/sweeps/*.yaml: a grid, or random draws) expanded into named
points, each a set of train.py flags with its own output folder; and the flag helpers the
submission and the search share."""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path
from typing import Any

from fine_tune.core.errors import UserError


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _name_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else format_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)


def point_name(point: dict) -> str:
    """Folder name of a sweep point, from its values (like key=value,key=value)."""
    return ",".join(f"{k}={_name_value(v)}" for k, v in point.items())


def _draw(spec: Any, rng: random.Random, key: str) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if kind in ("uniform", "log_uniform") and isinstance(bounds, list) and len(bounds) == 2:
            lo, hi = (float(b) for b in bounds)
            if kind == "uniform":
                return float(f"{rng.uniform(lo, hi):.3g}")
            if lo <= 0 or hi <= 0:
                raise UserError(f"sweep: {key}: log_uniform bounds must be > 0")
            return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
    raise UserError(f"sweep: {key}: give a list of values, or (with random:) {{uniform: [lo, hi]}} or "
                    "{log_uniform: [lo, hi]}")


def expand_sweep(path: str | os.PathLike) -> tuple[str, list[dict], dict]:
    """The sweep's name, its points (each a dict of train flags, named by point_name) and the
    flags every point gets (``fixed``)."""
    import itertools

    from fine_tune.core.config import load_yaml

    data = load_yaml(path, "--sweep", mapping=False)  # the check below says what a sweep file holds
    unknown = set(data) - {"name", "grid", "random", "seed", "fixed"}
    if unknown or not isinstance(data.get("grid"), dict) or not data["grid"]:
        raise UserError(f"--sweep {path}: expected a mapping with 'grid' (flag: [values]) and optionally "
                        "'random', 'seed', 'fixed', 'name'" + (f"; unknown keys: {sorted(unknown)}" if unknown else ""))
    grid: dict = data["grid"]
    fixed: dict = data.get("fixed") or {}
    n_random = data.get("random")
    if n_random is None:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"sweep: {key}: a grid needs a non-empty list of values (distributions need random: N)")
        points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    else:
        if not isinstance(n_random, int) or n_random < 1:
            raise UserError(f"sweep: random must be a positive integer, not {n_random!r}")
        rng = random.Random(data.get("seed", 0))
        points, seen = [], set()
        for _ in range(100 * n_random):
            point = {key: _draw(spec, rng, key) for key, spec in grid.items()}
            name = point_name(point)
            if name not in seen:
                seen.add(name)
                points.append(point)
            if len(points) == n_random:
                break
    if not isinstance(fixed, dict):
        raise UserError(f"--sweep {path}: 'fixed' must be a mapping of flag: value")
    return str(data.get("name") or Path(path).stem), points, fixed


def check_distinct_folders(points: list[dict]) -> None:
    """Two points of a sweep must never share an output folder (they would lock each other out,
    or one would resume the other): values that clean to the same name, or one value written
    twice (2.0e-5 and 0.00002), are refused before anything is submitted."""
    by_name: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_name.setdefault(point_name(point), []).append(i)
    for name, idx in by_name.items():
        if len(idx) > 1:
            shown = " and ".join(f"point {i + 1} ({', '.join(f'{k}: {format_value(v)}' for k, v in points[i].items())})"
                                 for i in idx)
            raise UserError(f"sweep: {shown} would write to the same folder {name}; make the values distinct "
                            "(a value written twice, or values that differ only in characters a folder name drops)")


def point_flags(point: dict) -> list[str]:
    flags = []
    for key, value in point.items():
        flags += [f"--{key}", format_value(value)]
    return flags


def has_flag(args: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def without_flag(args: list[str], name: str) -> list[str]:
    """The flags without any `--name value` / `--name=value` (we set that one ourselves)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == f"--{name}":
            skip = True
        elif not a.startswith(f"--{name}="):
            out.append(a)
    return out
