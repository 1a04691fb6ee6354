"""CoNLL files: one token per line, the word in the first column and the tag in the last
(``EU NNP B-NP B-ORG`` in CoNLL-2003, ``EU B-ORG`` in two-column files), blank lines between
sentences, ``-DOCSTART-`` document separators skipped."""

from __future__ import annotations


def read_conll(text: str) -> list[dict]:
    """Sentences as {"tokens": words, "tags": tags}; a line with one column is a word tagged O."""
    sentences, words, tags = [], [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append({"tokens": words, "tags": tags})
                words, tags = [], []
            continue
        words.append(parts[0])
        tags.append(parts[-1] if len(parts) > 1 else "O")
    if words:
        sentences.append({"tokens": words, "tags": tags})
    return sentences
