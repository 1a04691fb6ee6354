"""Compare runs: one row per run with the options that differ, eval metrics, speed; a plot.

    fine-tune compare runs/lr-*                      # markdown table, best first
    fine-tune compare runs/sweep --sort_by eval_f1_macro --format csv
    fine-tune compare runs/a runs/b --plot compare.png
    fine-tune compare --wandb my-team/fine_tune --group sweep-3

A run is an ``OUTPUT_DIR`` of ``train.py`` (``config.yaml`` + ``metrics.jsonl``); a folder that
holds runs (a sweep's root) stands for all of them, and quoted globs are expanded here; a
search's folder (``fine-tune submit --search``) gets the search's report instead (trials,
best command line, importances, objective plot; fine_tune.launchers.search).
The table shows only the options whose values differ between the runs, then the best and
final value of the chosen eval metric (``--sort_by``, by default the runs'
``--metric_for_best_model``), the final eval loss, the test score where there is one, the
optimizer steps, the wall time and the mean training throughput.

The runs are read by fine_tune.core.runs and tabulated by fine_tune.core.comparison (the
Slurm sweep prints the same table); this module adds W&B input, the plot and the command line.
From Python::

    from fine_tune.commands import compare
    print(compare.table(["runs/a", "runs/b"], sort_by="eval_accuracy", fmt="markdown"))
    compare.plot(["runs/a", "runs/b"], "compare.png")
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from fine_tune.core import plots
from fine_tune.core.comparison import FORMATS, differing_options, render, resolve_metric, rows
from fine_tune.core.comparison import table  # noqa: F401 - compare.table, as the docstring shows
from fine_tune.core.config import ConfigError, main_guard
from fine_tune.core.errors import UserError, first_line
from fine_tune.core.runs import Run, load_runs
from fine_tune.core.tables import fmt_value, is_number


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
                            "fine-tune compare OUTPUT_DIR ...")
        if not reachable(wandb_url()):
            raise UserError(f"--wandb: cannot reach W&B at {wandb_url()} (no network?); compare the local run "
                            "folders instead (fine-tune compare OUTPUT_DIR ...), or sync offline runs "
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
    plt = plots.pyplot()
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
    return plots.save(fig, path)


def plot(run_dirs: Iterable[str | os.PathLike], path: str | os.PathLike, sort_by: Optional[str] = None) -> Path:
    """Write the comparison plot of run folders to ``path`` (PNG)."""
    return plot_runs(load_runs(run_dirs), path, sort_by)


# ------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fine-tune compare", allow_abbrev=False,
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
        raise ConfigError("give run folders (fine-tune compare runs/*) or --wandb ENTITY/PROJECT")
    if args.group and not args.wandb:
        raise ConfigError("--group needs --wandb ENTITY/PROJECT")
    if len(args.run_dirs) == 1 and not args.wandb and (Path(args.run_dirs[0]) / "study.journal").is_file():
        # a search's folder (fine-tune submit --search): its trials, best command line, importances, plot
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
