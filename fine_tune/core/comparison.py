"""The comparison of runs: one row per run with the options that differ, the best and final
value of an eval metric, the final eval loss, the test score, steps, wall time and samples/s,
sorted best first.

``fine-tune compare`` prints it, and so does a Slurm sweep at its end::

    from fine_tune.core.comparison import table
    print(table(["runs/a", "runs/b"], sort_by="eval_accuracy", fmt="markdown"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Optional

from fine_tune.core.config import ConfigError, TrainConfig
from fine_tune.core.runs import Run, load_runs
from fine_tune.core.tables import fmt_duration, fmt_value, format_table, is_number
from fine_tune.core.tasks import TASKS

FORMATS = ("markdown", "csv", "json")
# options that name or route a run but do not change what it computes
BOOKKEEPING = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ignore_config_mismatch",
               "disable_tqdm", "report_to", "run_name", "wandb_project", "wandb_group", "wandb_tags",
               "expected_world_size", "eval_hook"}
EXTRA_OPTIONS = ("world_size", "git_commit")  # run metadata worth comparing (W&B configs hold them)
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "perplexity", "wall_time", "time")


def _option_names(runs: list[Run]) -> list[str]:
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    seen = [k for r in runs for k in r.config]
    ordered = [k for k in fields if k in seen] + [k for k in EXTRA_OPTIONS if k in seen]
    return [k for k in ordered if k not in BOOKKEEPING]


def _same(a, b) -> bool:
    if is_number(a) and is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def differing_options(runs: list[Run]) -> list[str]:
    """Options whose values are not the same in every run (bookkeeping options left out)."""
    out = []
    for key in _option_names(runs):
        values = [r.config.get(key) for r in runs]
        if any(not _same(values[0], v) for v in values[1:]):
            out.append(key)
    return out


def resolve_metric(name: Optional[str], runs: list[Run]) -> str:
    """Flat metric name: 'eval/accuracy', 'accuracy' and 'eval_accuracy' all mean eval_accuracy;
    by default the runs' --metric_for_best_model."""
    from fine_tune.core.tracking import flat_name

    if not name:
        first = runs[0].results.get("metric_for_best_model") if runs else None
        if first:
            return first
        cfg = runs[0].config if runs else {}
        task = TASKS.get(cfg.get("task"))
        base = cfg.get("metric_for_best_model") or (task.default_best_metric if task else "accuracy")
        return base if base.startswith("eval_") else f"eval_{base}"
    name = flat_name(name) if "/" in name else name
    logged = {k for r in runs for rec in r.records for k in rec} | {k for r in runs for k in r.results}
    if name in logged:
        return name
    if f"eval_{name}" in logged:
        return f"eval_{name}"
    available = sorted(k for k in logged if k.startswith(("eval_", "test_")) or k in ("loss",))
    raise ConfigError(f"--sort_by {name!r}: no run logged it; available: {', '.join(available) or 'none'}")


def greater_is_better(metric: str, runs: list[Run]) -> bool:
    for run in runs:
        cfg = run.config
        best = cfg.get("metric_for_best_model")
        if best and cfg.get("greater_is_better") is not None and metric in (best, f"eval_{best}"):
            return bool(cfg["greater_is_better"])
    return not any(metric.endswith(s) for s in LOWER_IS_BETTER)


def rows(runs: list[Run], sort_by: Optional[str] = None) -> tuple[list[str], list[dict], str]:
    """The comparison as (columns, one dict per run sorted best first, metric)."""
    metric = resolve_metric(sort_by, runs)
    greater = greater_is_better(metric, runs)
    options = differing_options(runs)
    test_key = "test_" + metric[len("eval_"):] if metric.startswith("eval_") else None
    out = []
    for run in runs:
        series = run.series(metric)
        best = (max if greater else min)(series, key=lambda p: p[1]) if series else None
        final = run.results.get(metric) if is_number(run.results.get(metric)) else (series[-1][1] if series else None)
        loss_series = run.series("eval_loss")
        row = {"run": run.name, **{k: run.config.get(k) for k in options},
               f"best_{metric}": best[1] if best else None, "best_step": best[0] if best else None,
               f"final_{metric}": final}
        if metric != "eval_loss":
            row["final_eval_loss"] = run.results.get("eval_loss", loss_series[-1][1] if loss_series else None)
        if test_key:
            row[test_key] = run.results.get(test_key)
        row.update({"steps": run.steps(), "wall_time_s": run.elapsed(),
                    "samples_per_second": run.samples_per_second()})
        if not run.finished:
            row["status"] = "partial"
        out.append(row)
    if test_key and all(r.get(test_key) is None for r in out):
        for r in out:
            r.pop(test_key, None)
    if any("status" in r for r in out):
        for r in out:
            r.setdefault("status", "done")
    key = f"best_{metric}"
    sign = -1.0 if greater else 1.0
    out.sort(key=lambda r: (r[key] is None, sign * r[key] if r[key] is not None else 0.0, r["run"]))
    columns = list(dict.fromkeys(k for r in out for k in r))
    return columns, out, metric


def render(runs: list[Run], sort_by: Optional[str] = None, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not allowed: choose from {', '.join(FORMATS)}")
    columns, table_rows, _ = rows(runs, sort_by)
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in table_rows], indent=2) + "\n"
    if fmt == "csv":
        return format_table(columns, [[r.get(c) for c in columns] for r in table_rows], "csv")
    def cell(column: str, value) -> str:
        if column == "wall_time_s":
            return fmt_duration(value)
        if isinstance(value, float) and column == "samples_per_second":
            return f"{value:.1f}"
        if isinstance(value, float) and column.startswith(("best_", "final_", "test_")):
            return f"{value:.4f}"  # metrics: fixed decimals, so that columns line up
        return fmt_value(value)

    cells = [[cell(c, r.get(c)) for c in columns] for r in table_rows]
    headers = ["wall_time" if c == "wall_time_s" else c for c in columns]
    numeric = [c == "wall_time_s" or (any(is_number(r.get(c)) for r in table_rows)
                                      and all(is_number(r.get(c)) or r.get(c) is None for r in table_rows))
               for c in columns]
    return format_table(headers, cells, "markdown", numeric=numeric)


def table(run_dirs: Iterable[str | os.PathLike], sort_by: Optional[str] = None, fmt: str = "markdown") -> str:
    """The comparison table of run folders (or folders of runs, or globs) as text."""
    return render(load_runs(run_dirs), sort_by, fmt)
