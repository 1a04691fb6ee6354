"""Compare runs: one row per run with the options that differ, eval metrics, speed; a plot.

    python -m fine_tune.compare runs/lr-*                      # markdown table, best first
    python -m fine_tune.compare runs/sweep --sort_by eval_f1_macro --format csv
    python -m fine_tune.compare runs/a runs/b --plot compare.png
    python -m fine_tune.compare --wandb my-team/fine_tune --group sweep-3

A run is an ``OUTPUT_DIR`` of ``train.py`` (``config.yaml`` + ``metrics.jsonl``); a folder that
holds runs (a sweep's root) stands for all of them, and quoted globs are expanded here; a
search's folder (``slurm/submit.py --search``) gets the search's report instead (trials,
best command line, importances, objective plot; fine_tune.launchers.search).
The table shows only the options whose values differ between the runs, then the best and
final value of the chosen eval metric (``--sort_by``, by default the runs'
``--metric_for_best_model``), the final eval loss, the test score where there is one, the
optimizer steps, the wall time and the mean training throughput.

From Python (the Slurm sweep uses this)::

    from fine_tune.commands import compare
    print(compare.table(["runs/a", "runs/b"], sort_by="eval_accuracy", fmt="markdown"))
    compare.plot(["runs/a", "runs/b"], "compare.png")
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from fine_tune.core.config import ConfigError, main_guard
from fine_tune.core.errors import UserError, first_line
from fine_tune.core.tables import fmt_value, format_table, is_number

FORMATS = ("markdown", "csv", "json")
# options that name or route a run but do not change what it computes
BOOKKEEPING = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ignore_config_mismatch",
               "disable_tqdm", "report_to", "run_name", "wandb_project", "wandb_group", "wandb_tags",
               "expected_world_size", "eval_hook"}
EXTRA_OPTIONS = ("world_size", "git_commit")  # run metadata worth comparing (W&B configs hold them)
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "perplexity", "wall_time", "time")


# ------------------------------------------------------------------ tables


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    """One training run, read from its output folder (or from W&B)."""
    name: str
    path: str
    config: dict
    records: list = field(default_factory=list)  # metrics.jsonl events: {"step": n, metric: value, ...}
    results: dict = field(default_factory=dict)  # eval_results.json (written when the run finished)
    wall_time: Optional[float] = None  # seconds, where known from elsewhere (W&B runtime)
    finished: bool = True

    def series(self, metric: str) -> list[tuple[int, float]]:
        """(optimizer step, value) of every event that logged ``metric``; a step logged
        twice (events re-logged after a resume) keeps its last value."""
        points = {}
        for r in self.records:
            value = r.get(metric)
            if is_number(value) and "step" in r:
                points[int(r["step"])] = float(value)
        return sorted(points.items())

    def steps(self) -> Optional[int]:
        steps = [int(r["step"]) for r in self.records if "step" in r]
        if self.results.get("global_step") is not None:
            steps.append(int(self.results["global_step"]))
        return max(steps) if steps else None

    def elapsed(self) -> Optional[float]:
        if self.wall_time is not None:
            return self.wall_time
        times = [r["elapsed_s"] for r in self.records if is_number(r.get("elapsed_s"))]
        if times:
            return max(times)
        folder = Path(self.path)  # runs logged before elapsed_s existed: file times
        end = [p.stat().st_mtime for p in (folder / "eval_results.json", folder / "metrics.jsonl") if p.exists()]
        start = folder / "config.yaml"
        if end and start.exists():
            return max(0.0, max(end) - start.stat().st_mtime)
        return None

    def samples_per_second(self) -> Optional[float]:
        values = [r["samples_per_second"] for r in self.records if is_number(r.get("samples_per_second"))]
        return sum(values) / len(values) if values else None


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file()
                                                 or (path / "eval_results.json").is_file())


def find_run_dirs(patterns: Iterable[str]) -> list[Path]:
    """Run folders named by the arguments: run folders, folders holding runs, globs."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        if not matches or not any(Path(m).exists() for m in matches):
            raise UserError(f"{pattern}: no such run folder (give OUTPUT_DIR folders of train.py, or a glob)")
        for m in map(Path, matches):
            if is_run_dir(m):
                found.append(m)
            elif m.is_dir():
                inner = sorted(p.parent for p in m.rglob("config.yaml")
                               if "checkpoints" not in p.relative_to(m).parts and is_run_dir(p.parent))
                if not inner and not glob.has_magic(expanded):
                    raise UserError(f"{m} holds no run (a run folder has config.yaml and metrics.jsonl); "
                                    "give OUTPUT_DIR folders of train.py")
                found.extend(inner)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"no run folders in {' '.join(patterns)}")
    return unique


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(record, dict):
                records.append(record)
    return records


def load_run(path: str | os.PathLike, name: Optional[str] = None) -> Run:
    import yaml

    folder = Path(path)
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{folder}: cannot read config.yaml ({e})") from None
    results = {}
    if (folder / "eval_results.json").exists():
        try:
            results = json.loads((folder / "eval_results.json").read_text())
        except json.JSONDecodeError:
            results = {}
    return Run(name=name or config.get("run_name") or folder.name, path=str(folder), config=config,
               records=_read_jsonl(folder / "metrics.jsonl"), results=results,
               finished=bool(results))


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """Load run folders (or folders of runs, or globs), each named uniquely."""
    dirs = find_run_dirs([str(d) for d in run_dirs])
    runs = [load_run(d) for d in dirs]
    _unique_names(runs, dirs)
    return runs


def _unique_names(runs: list[Run], dirs: list[Path]) -> None:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return
    root = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    for run, d in zip(runs, dirs):
        run.name = str(d.relative_to(root)) if d != root else d.name


# ------------------------------------------------------------------ W&B
def load_wandb_runs(path: str, group: Optional[str] = None, api=None) -> list[Run]:
    """Runs of a W&B project (``ENTITY/PROJECT``) through wandb's public API."""
    from fine_tune.core.tracking import flat_name, reachable, wandb_url

    if "/" not in path.strip("/"):
        raise ConfigError(f"--wandb {path!r}: give ENTITY/PROJECT, e.g. my-team/fine_tune")
    if api is None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode in ("offline", "disabled", "dryrun"):
            raise UserError(f"--wandb reads runs from the W&B server, but WANDB_MODE={mode}; unset it (and "
                            "have network access), or compare the local run folders: "
                            "python -m fine_tune.compare OUTPUT_DIR ...")
        if not reachable(wandb_url()):
            raise UserError(f"--wandb: cannot reach W&B at {wandb_url()} (no network?); compare the local run "
                            "folders instead (python -m fine_tune.compare OUTPUT_DIR ...), or sync offline runs "
                            "with `wandb sync OUTPUT_DIR/wandb/offline-run-*` once online")
        try:
            import wandb

            api = wandb.Api(timeout=30)
        except Exception as e:  # noqa: BLE001 - no credentials and the like
            raise UserError(f"--wandb: W&B API unavailable ({first_line(e)}); run `wandb login` or set "
                            "WANDB_API_KEY") from None
    try:
        found = list(api.runs(path.strip("/"), filters={"group": group} if group else {}))
    except Exception as e:  # noqa: BLE001 - unknown project, auth, server errors
        raise UserError(f"--wandb {path}: {first_line(e)}") from None
    if not found:
        where = f" in group {group!r}" if group else ""
        raise UserError(f"--wandb {path}: no runs{where}")
    runs = []
    for r in found:
        config = {k: (v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v)
                  for k, v in dict(r.config).items() if not str(k).startswith("_")}
        records = []
        for row in r.scan_history():
            step = row.get("_step")
            if step is None:
                continue
            metrics = {flat_name(k): v for k, v in row.items()
                       if "/" in str(k) and not str(k).startswith("_") and is_number(v)}
            if metrics:
                records.append({"step": int(step), **metrics})
        summary = dict(r.summary) if getattr(r, "summary", None) is not None else {}
        results = {flat_name(k): v for k, v in summary.items() if str(k).startswith("test/") and is_number(v)}
        runtime = summary.get("_runtime")
        state = getattr(r, "state", "finished")
        runs.append(Run(name=r.name or r.id, path=f"wandb:{path.strip('/')}/{r.id}", config=config,
                        records=records, results=results,
                        wall_time=float(runtime) if is_number(runtime) else None,
                        finished=state == "finished"))
    return runs


# ------------------------------------------------------------------ the comparison
def _option_names(runs: list[Run]) -> list[str]:
    import dataclasses

    from fine_tune.core.config import TrainConfig

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
        base = cfg.get("metric_for_best_model") or {"token-classification": "f1", "regression": "mse"}.get(
            cfg.get("task"), "accuracy")
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


# ------------------------------------------------------------------ plot
def run_labels(runs: list[Run]) -> dict[str, str]:
    """Legend label per run: the options that differ (``learning_rate=0.0001, ...``)."""
    options = differing_options(runs)
    labels = {}
    for run in runs:
        parts = [f"{k}={fmt_value(run.config.get(k))}" for k in options]
        labels[run.name] = ", ".join(parts) if parts and len(parts) <= 3 else run.name
        if parts and len(parts) > 3:
            labels[run.name] = f"{run.name}: " + ", ".join(parts[:3]) + ", ..."
    if len(set(labels.values())) < len(labels):  # same options (e.g. reruns): add the names
        labels = {r.name: f"{r.name}: {labels[r.name]}" if labels[r.name] != r.name else r.name for r in runs}
    return labels


def plot_runs(runs: list[Run], path: str | os.PathLike, sort_by: Optional[str] = None) -> Path:
    """Training loss and the chosen eval metric against the optimizer step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = resolve_metric(sort_by, runs)
    labels = run_labels(runs)
    _, ordered, _ = rows(runs, sort_by)
    order = [r["run"] for r in ordered]
    by_name = {r.name: r for r in runs}
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(order):
        run = by_name[name]
        color = colors[i % len(colors)]
        loss = run.series("loss")
        if loss:
            ax_loss.plot(*zip(*loss), color=color, linewidth=1.6, label=labels[name])
        points = run.series(metric)
        if points:
            ax_metric.plot(*zip(*points), color=color, linewidth=1.6, marker="o", markersize=4, label=labels[name])
    ax_loss.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax_metric.set(title=f"{metric} (validation)" if metric.startswith("eval_") else metric,
                  xlabel="optimizer step", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(True, alpha=0.3)
    handles, names = ax_loss.get_legend_handles_labels()
    if not handles:
        handles, names = ax_metric.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(handles), 3), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(handles) - 1) // 3), 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(run_dirs: Iterable[str | os.PathLike], path: str | os.PathLike, sort_by: Optional[str] = None) -> Path:
    """Write the comparison plot of run folders to ``path`` (PNG)."""
    return plot_runs(load_runs(run_dirs), path, sort_by)


# ------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fine_tune.compare", allow_abbrev=False,
        description="Compare training runs: one row per run with the options that differ, the best and final "
                    "eval metric, steps, wall time and samples/s; optionally a plot.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="OUTPUT_DIR of train.py, a folder holding runs, or a glob")
    parser.add_argument("--sort_by", metavar="METRIC",
                        help="metric to rank by and plot, e.g. eval_accuracy, eval_f1_macro, eval_loss "
                             "(default: the runs' --metric_for_best_model)")
    parser.add_argument("--format", default="markdown", choices=FORMATS, metavar="{" + ",".join(FORMATS) + "}",
                        help="table format (default: markdown)")
    parser.add_argument("--plot", metavar="FILE.png", help="also write training loss and the metric vs step")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B (needs network)")
    parser.add_argument("--group", metavar="G", help="with --wandb: only runs of this W&B group")
    return parser


@main_guard
def main(argv: Optional[list[str]] = None) -> None:
    parser = build_parser()

    def error(message):
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.wandb:
        raise ConfigError("give run folders (python -m fine_tune.compare runs/*) or --wandb ENTITY/PROJECT")
    if args.group and not args.wandb:
        raise ConfigError("--group needs --wandb ENTITY/PROJECT")
    if len(args.run_dirs) == 1 and not args.wandb and (Path(args.run_dirs[0]) / "study.journal").is_file():
        # a search's folder (slurm/submit.py --search): its trials, best command line, importances, plot
        from fine_tune.launchers.search import report

        sys.stdout.write(report(args.run_dirs[0]))
        return
    runs = load_runs(args.run_dirs) if args.run_dirs else []
    if args.wandb:
        runs += load_wandb_runs(args.wandb, args.group)
    sys.stdout.write(render(runs, args.sort_by, args.format))
    if args.plot:
        out = plot_runs(runs, args.plot, args.sort_by)
        print(f"plot written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
