"""The two plots of ``fine-tune explore --plots DIR``: the label distribution per split (bars of
shares, or a histogram of values for regression) and the token lengths of the reference split
against ``--max_length`` and the recommended length."""

from __future__ import annotations

import math
from pathlib import Path

from fine_tune.commands.explore_report import pct
from fine_tune.core import plots

LABEL_PLOT = "label_distribution.png"
LENGTH_PLOT = "token_lengths.png"


def write_plots(facts: dict, folder: str | Path) -> list[str]:
    """Both plots into ``folder``; the paths written."""
    plt = plots.pyplot()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for draw, name in ((label_plot, LABEL_PLOT), (length_plot, LENGTH_PLOT)):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        draw(ax, facts, colors)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(str(plots.save(fig, out / name)))
    return written


def label_plot(ax, facts: dict, colors: list) -> None:
    """Regression: a histogram of the values per split; else the share of each label per split."""
    if facts["labels"]["kind"] == "values":
        _value_histogram(ax, facts, colors)
    else:
        _label_bars(ax, facts, colors)


def _value_histogram(ax, facts: dict, colors: list) -> None:
    labels = facts["labels"]
    for i, (name, values) in enumerate(labels["_values"].items()):
        ax.hist(values, bins=40, histtype="stepfilled" if i == 0 else "step", alpha=0.5 if i == 0 else 1,
                density=True, color=colors[i % len(colors)], linewidth=1.6, label=f"{name} (n={len(values)})")
    ax.axvline(labels["mean_baseline"]["prediction"], color="black", linestyle="--", linewidth=1,
               label=f"{facts['reference_split']} mean (the baseline prediction)")
    ax.set(title="Label distribution", xlabel="label value", ylabel="density")


def _label_bars(ax, facts: dict, colors: list) -> None:
    import numpy as np

    labels = facts["labels"]
    names = list(labels["names"])
    note = ""
    if labels["kind"] == "tags" and "O" in names:  # O dwarfs the entity tags
        share_o = labels["shares"][facts["reference_split"]]["O"]
        names.remove("O")
        note = f" (O: {share_o:.1%} of {facts['reference_split']} tokens, not shown)"
    splits = list(labels["counts"])
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(names))
    for i, split in enumerate(splits):
        shares = [100 * labels["shares"][split][n] for n in names]
        bars = ax.bar(x + (i - (len(splits) - 1) / 2) * width, shares, width,
                      label=f"{split} (n={sum(labels['counts'][split].values())})", color=colors[i % len(colors)])
        if split == facts["reference_split"]:
            for bar, n in zip(bars, names):
                ax.annotate(str(labels["counts"][split][n]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, names, rotation=30 if max((len(n) for n in names), default=0) > 8 else 0,
                  ha="right" if max((len(n) for n in names), default=0) > 8 else "center")
    unit = "tokens" if labels["kind"] == "tags" else "examples"
    ax.set(title=f"Label distribution{note}", ylabel=f"% of {unit}")
    if labels["kind"] == "classes":
        base = labels["majority_baseline_accuracy"].get(facts["reference_split"])
        ax.axhline(100 * base, color="black", linestyle=":", linewidth=1,
                   label=f"majority class '{labels['majority_label']}' ({base:.1%})")


def length_plot(ax, facts: dict, colors: list) -> None:
    """Token lengths of the reference split, with --max_length, the recommended length and the median."""
    import numpy as np

    info = facts["token_lengths"]
    ref = facts["reference_split"]
    lengths = facts["_lengths"][ref]
    stats = info["splits"][ref]
    top = max(max(lengths), info["max_length"]) if lengths else info["max_length"]
    bins = np.arange(0, top + 2, max(1, int(math.ceil((top + 1) / 60))))
    ax.hist(lengths, bins=bins, color=colors[0], alpha=0.8, label=f"{ref} (n={len(lengths)})")
    ax.axvline(info["max_length"], color="red", linewidth=2,
               label=f"--max_length {info['max_length']}: {pct(stats['truncated_share'])} truncated")
    rec = info["recommended_max_length"]
    if rec != info["max_length"]:
        ax.axvline(rec, color="green", linewidth=1.5, linestyle="--",
                   label=f"recommended {rec} (p99 = {stats['p99']:.1f})")
    ax.axvline(stats["median"], color="black", linewidth=1, linestyle=":", label=f"median {stats['median']:g}")
    ax.set(title=f"Token lengths under {facts['tokenizer']} (special tokens included)",
           xlabel="tokens per example", ylabel="examples")
