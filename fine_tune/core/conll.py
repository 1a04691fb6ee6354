"""CoNLL files (one 'word ... tag' line per token, blank lines between sentences)."""

from __future__ import annotations


def read_conll(text: str) -> list[dict]:
    """Parse 'word tag' lines with blank lines between sentences."""
    sentences, words, tags = [], [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            if words:
                sentences.append({"tokens": words, "tags": tags})
                words, tags = [], []
            continue
        parts = line.split()
        words.append(" ".join(parts[:-1]) if len(parts) > 1 else parts[0])
        tags.append(parts[-1] if len(parts) > 1 else "O")
    if words:
        sentences.append({"tokens": words, "tags": tags})
    return sentences
