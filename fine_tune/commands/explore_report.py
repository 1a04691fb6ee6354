"""What ``fine-tune explore`` prints: the facts of fine_tune.commands.explore as text tables
(:func:`render`), or as JSON without the raw arrays kept for the plots (:func:`public`)."""

from __future__ import annotations

import math

from fine_tune.core.tables import fmt_value, format_table

EXAMPLE_CHARS = 110  # text shown per example in the terminal (JSON keeps the whole text)


def public(facts: dict) -> dict:
    """The facts without the raw arrays kept for the plots."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    return clean(facts)


def short(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def pct(share: float) -> str:
    if share == 0:
        return "0%"
    return f"{100 * share:.2f}%" if share < 0.001 else f"{100 * share:.1f}%"


def num(value) -> str:
    """Token statistics: integers as such, other values with one decimal."""
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def render(facts: dict) -> str:
    """The whole report: splits, labels (by kind), token lengths, examples, tokenization, plots."""
    splits = facts["splits"]
    ref = facts["reference_split"]
    labels = facts["labels"]
    names = list(splits)
    out = [f"Data: {facts['task']}, columns {', '.join(facts['columns'])}",
           format_table(["split", "examples"], [[k, v] for k, v in splits.items()])]
    if labels["kind"] in ("classes", "tags"):
        out += _classes_or_tags(labels, names, ref)
    elif labels["kind"] == "label_sets":
        out += _label_sets(labels, names)
    else:
        out += _values(labels, names, ref)
    out += _token_lengths(facts, names, ref)
    out += _examples(labels, ref)
    if facts.get("tokenization"):
        out += _tokenization(facts["tokenization"])
    if facts.get("plots"):
        out.append("plots: " + ", ".join(facts["plots"]))
    return "\n".join(out).rstrip() + "\n"


def _counts_table(labels: dict, names: list[str], header: str) -> str:
    rows = [[label] + [f"{labels['counts'][s][label]} ({pct(labels['shares'][s][label])})" for s in names]
            for label in labels["names"]]
    return format_table([header] + names, rows, numeric=[False] + [True] * len(names))


def _advice(advice: dict) -> str:
    weights = ", ".join(f"{k} {v:.3g}" for k, v in advice["balanced"].items())
    return (f"imbalanced ({advice['why']}): consider --class_weights balanced, which would weigh the loss by "
            f"{weights}\n")


def _classes_or_tags(labels: dict, names: list[str], ref: str) -> list[str]:
    what = "Labels" if labels["kind"] == "classes" else "Tags (per token)"
    out = [f"{what}: {len(labels['names'])}",
           _counts_table(labels, names, "label" if labels["kind"] == "classes" else "tag")]
    ratio = labels["imbalance_ratio"]
    ratio_text = f"{ratio:.2f}" if ratio is not None else "inf (a label never occurs)"
    out.append(f"imbalance ratio ({ref}, majority/minority): {ratio_text} "
               f"('{labels['majority_label']}' / '{labels['minority_label']}')")
    if labels.get("missing_in_reference"):
        out.append(f"labels absent from {ref}: {', '.join(labels['missing_in_reference'])}")
    base = ", ".join(f"{v:.4f} on {k}" for k, v in labels["majority_baseline_accuracy"].items())
    unit = "token accuracy" if labels["kind"] == "tags" else "accuracy"
    out.append(f"majority-class baseline (always '{labels['majority_label']}'): {unit} {base}\n")
    if labels.get("class_weights", {}).get("recommended"):
        out.append(_advice(labels["class_weights"]))
    if labels["kind"] == "tags":
        out += _entities(labels, names)
    return out


def _entities(labels: dict, names: list[str]) -> list[str]:
    out = []
    ent_names = list(dict.fromkeys(k for s in names for k in labels["entities"][s]))
    if ent_names:
        out.append("Entities (spans)")
        out.append(format_table(["entity"] + names, [[e] + [labels["entities"][s].get(e, 0) for s in names]
                                                      for e in ent_names]))
    w = labels["words_per_sentence"]
    out.append("Words per sentence")
    out.append(format_table(["stat"] + names, [[k] + [num(w[s].get(k)) for s in names] for k in
                                                ("min", "median", "mean", "p95", "max")],
                            numeric=[False] + [True] * len(names)))
    out.append("sentences without entities: "
               + ", ".join(f"{pct(v)} of {k}" for k, v in labels["sentences_without_entities"].items()) + "\n")
    return out


def _label_sets(labels: dict, names: list[str]) -> list[str]:
    out = [f"Labels: {len(labels['names'])} (an example may carry several; counts are examples)",
           _counts_table(labels, names, "label")]
    sizes = sorted({k for s in names for k in labels["set_sizes"][s]})
    out.append("Labels per example")
    rows = [[str(k)] + [labels["set_sizes"][s].get(k, 0) for s in names] for k in sizes]
    rows.append(["mean"] + [f"{labels['mean_labels_per_example'][s]:.3f}" for s in names])
    out.append(format_table(["labels"] + names, rows, numeric=[False] + [True] * len(names)))
    top = labels["most_frequent_set"]
    for title, key in (("all-negative baseline (no label ever)", "all_negative_baseline"),
                       (f"most-frequent-set baseline (always {{{', '.join(top)}}})", "most_frequent_set_baseline")):
        b = labels[key]
        out.append(f"{title}: " + "; ".join(
            f"{s}: subset accuracy {b[s]['accuracy']:.4f}, Hamming loss {b[s]['hamming_loss']:.4f}, "
            f"micro F1 {b[s]['f1_micro']:.4f}" for s in names))
    out.append("")
    if labels["class_weights"]["recommended"]:
        out.append(_advice(labels["class_weights"]))
    return out


def _values(labels: dict, names: list[str], ref: str) -> list[str]:
    st = labels["stats"]
    b = labels["mean_baseline"]
    return ["Label values",
            format_table(["stat"] + names, [[k] + [st[s][k] for s in names] for k in
                                            ("count", "mean", "std", "min", "p25", "median", "p75", "max")]),
            f"mean baseline (always predict {b['prediction']:.4f}, the {ref} mean): MSE "
            + ", ".join(f"{v:.4f} on {k}" for k, v in b["mse"].items()) + "\n"]


def _token_lengths(facts: dict, names: list[str], ref: str) -> list[str]:
    tl = facts["token_lengths"]
    stat_rows = [[k] + [num(tl["splits"][s].get(k)) for s in names]
                 for k in ("min", "median", "mean", "p90", "p95", "p99", "max")]
    stat_rows.append([f"> --max_length {tl['max_length']}"] +
                     [f"{tl['splits'][s]['truncated']} ({pct(tl['splits'][s]['truncated_share'])})" for s in names])
    stat_rows.append(["unknown tokens"] + [pct(tl["splits"][s]["unknown_token_share"]) for s in names])
    limit = f", the model accepts {tl['model_max_length']}" if tl["model_max_length"] else ""
    return [f"Token lengths under {facts['tokenizer']} (special tokens included)",
            format_table(["tokens"] + names, stat_rows, numeric=[False] + [True] * len(names)),
            f"recommended --max_length: {tl['recommended_max_length']} "
            f"(covers the {ref} p99 of {fmt_value(tl['splits'][ref]['p99'])} tokens, a multiple of 8{limit}); "
            f"now {tl['max_length']}\n"]


def _examples(labels: dict, ref: str) -> list[str]:
    if not labels.get("examples"):
        return []
    if labels["kind"] in ("classes", "label_sets"):
        n = max(len(v) for v in labels["examples"].values())
        rows = [[label, short(t)] for label, texts in labels["examples"].items() for t in texts]
        return [f"Examples ({ref}, first {n} of each label)", format_table(["label", "text"], rows)]
    if labels["kind"] == "values":
        return [f"Examples ({ref})",
                format_table(["label", "text"], [[e["label"], short(e["text"])] for e in labels["examples"]])]
    if labels["kind"] == "tags":
        return [f"Examples with entities ({ref}; word/TAG, O words bare)",
                *(f"  {short(e, 160)}" for e in labels["examples"]), ""]
    return []


def _tokenization(tok: dict) -> list[str]:
    out = [f"Tokenization of {tok['text']!r}: {tok['num_tokens']} tokens"]
    per_line = 10
    for start in range(0, len(tok["tokens"]), per_line):
        toks, ids = tok["tokens"][start:start + per_line], tok["ids"][start:start + per_line]
        widths = [max(len(str(t)), len(str(i))) for t, i in zip(toks, ids)]
        out.append("  token  " + "  ".join(str(t).ljust(w) for t, w in zip(toks, widths)))
        out.append(("  id     " + "  ".join(str(i).ljust(w) for i, w in zip(ids, widths))).rstrip())
    specials = ", ".join(f"{t}={i}" for t, i in tok["special_tokens"].items())
    out.append(f"special tokens added: {' '.join(tok['special_tokens_in_text']) or 'none'}  "
               f"(the tokenizer's special tokens: {specials})")
    out.append(f"decoded:                        {tok['decoded']}")
    out.append(f"decoded without special tokens: {tok['decoded_without_special_tokens']}")
    out.append(f"round trip: {tok['round_trip']}" +
               (f"; {tok['unknown_tokens']} unknown token(s)" if tok["unknown_tokens"] else "") + "\n")
    return out
