"""A corpus with planted duplicates and low-quality documents, and its ground truth (tests and
benchmarks/curate_bench.py measure precision and recall on it).

Near copies are made the way the web makes them: a few words changed, a boilerplate line added, the tail cut. The
truth records, per planted copy, its original and their exact word 5-gram Jaccard.
"""

from __future__ import annotations

import random
import re
from typing import Any

from mtnlg.curate.rules import jaccard

_PROSE_WORD = re.compile(r"[A-Za-z][a-z]*[.,;:]?")
STOP = ["the", "of", "and", "to", "that", "with", "have", "be", "is", "in", "for", "on", "as", "it", "was"]
BOILERPLATE = "Share this article with your friends and family on social media today."


def synthetic_background(n: int, seed: int = 0, sentences: int = 12) -> list[str]:
    """``n`` distinct prose-like documents (random words from a large made-up vocabulary, stop words, one sentence
    per line) that pass the Gopher and C4 rules."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(8000)]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(sentences):
            ws = [rng.choice(STOP) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(rng.randint(8, 16))]
            lines.append(" ".join(ws).capitalize() + ".")
        docs.append("\n".join(lines))
    return docs


def stdlib_background(n: int, min_words: int = 120) -> list[str]:
    """Prose from the docstrings of this Python's standard library: ``n`` documents of sentences drawn in a shuffled
    order (at least ``min_words`` words each), one sentence per line. Past the first pass over the sentences a
    document repeats sentences of others, each a few percent of it at most, far below any duplicate threshold."""
    from mtnlg.data.corpus import module_document, stdlib_files

    files = stdlib_files()
    root = files[0].parent
    sentences: list[str] = []
    seen: set[str] = set()
    for path in files:
        text = module_document(path, root) or ""
        for para in re.split(r"\n\s*\n", text):
            flat = " ".join(para.split())
            if len(flat.split()) < 8 or not flat[0].isupper() or "{" in flat or ">>>" in flat:
                continue
            for s in re.split(r"(?<=[.!?])\s+", flat):
                ws = s.split()
                prose = sum(1 for w in ws if _PROSE_WORD.fullmatch(w)) >= 0.95 * len(ws)  # not code
                if len(ws) >= 5 and s.endswith(".") and prose and s not in seen:
                    seen.add(s)
                    sentences.append(s)
    rng = random.Random(0)
    rng.shuffle(sentences)
    docs, cur, count, k = [], [], 0, 0
    while len(docs) < n:  # consecutive sentences of the shuffled list; once used up, a fresh shuffle
        if k == len(sentences):
            rng.shuffle(sentences)
            k = 0
        cur.append(sentences[k])
        count += len(sentences[k].split())
        k += 1
        if count >= min_words:
            docs.append("\n".join(cur))
            cur, count = [], 0
    return docs


def near_copy(text: str, rng: random.Random, kind: str) -> str:
    lines = text.split("\n")
    if kind == "words":  # a few words changed
        ws = text.split(" ")
        for i in rng.sample(range(len(ws)), max(1, len(ws) // 60)):
            ws[i] = rng.choice(STOP)
        return " ".join(ws)
    if kind == "boilerplate":
        return "\n".join([*lines, BOILERPLATE])
    if kind == "tail":  # the last ~8% of the lines cut
        return "\n".join(lines[: max(1, len(lines) - max(1, len(lines) // 12))])
    raise ValueError(kind)


LOW_QUALITY = {
    "gopher_short_doc": lambda rng, d: " ".join(d.split()[:30]) + ".",
    "gopher_too_many_hashes": lambda rng, d: d.replace(" ", " #", 40),
    "gopher_too_many_bullets": lambda rng, d: "\n".join("- " + line for line in d.split("\n")),
    "dup_line_frac": lambda rng, d: "\n".join([d.split("\n")[0]] * 10 + d.split("\n")[:3]),
    "curly_bracket": lambda rng, d: d + "\nThe value of the function is {x} and more text here.",
    "lorem_ipsum": lambda rng, d: d + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
}


def planted_corpus(background: list[str], exact: int, near: int, low: int, seed: int = 0
                   ) -> tuple[list[str], dict[str, Any]]:
    """Documents in a shuffled order and the truth: ``copies`` [{doc, original, kind, jaccard}] (indexes into
    the returned list) and ``low`` [{doc, rule}]."""
    rng = random.Random(seed)
    items: list[tuple[str, Any]] = [(d, ("orig", i)) for i, d in enumerate(background)]
    for _ in range(exact):
        i = rng.randrange(len(background))
        items.append((background[i], ("exact", i)))
    kinds = ["words", "boilerplate", "tail"]
    for k in range(near):
        i = rng.randrange(len(background))
        items.append((near_copy(background[i], rng, kinds[k % 3]), (kinds[k % 3], i)))
    names = list(LOW_QUALITY)
    for k in range(low):
        i = rng.randrange(len(background))
        items.append((LOW_QUALITY[names[k % len(names)]](rng, background[i]), ("low", names[k % len(names)])))
    rng.shuffle(items)
    pos_of_orig = {tag[1]: p for p, (_, tag) in enumerate(items) if tag[0] == "orig"}
    copies, lows = [], []
    for p, (text, tag) in enumerate(items):
        if tag[0] == "low":
            lows.append({"doc": p, "rule": tag[1]})
        elif tag[0] != "orig":
            o = pos_of_orig[tag[1]]
            copies.append({"doc": p, "original": o, "kind": tag[0], "jaccard": jaccard(text, items[o][0])})
    return [t for t, _ in items], {"copies": copies, "low": lows}


def score(truth: dict[str, Any], removed: dict[int, tuple[str, str]], threshold: float = 0.8) -> dict[str, Any]:
    """Precision and recall of duplicate removal. A planted pair (original, copy) with Jaccard >= threshold is
    caught when not both are kept; a duplicate removal is correct when the removed document belongs to a planted
    family (an original or copy of one) that keeps a member."""
    dup_steps = ("exact", "near")
    fam: dict[int, int] = {}
    for c in truth["copies"]:
        fam[c["doc"]] = fam[c["original"]] = c["original"]
    pairs = [c for c in truth["copies"] if c["jaccard"] >= threshold]
    caught = sum(1 for c in pairs if c["doc"] in removed or c["original"] in removed)
    members: dict[int, list[int]] = {}
    for d, f in fam.items():
        members.setdefault(f, []).append(d)
    dup_removed = [d for d, (step, _) in removed.items() if step in dup_steps]
    correct = sum(1 for d in dup_removed if d in fam and any(m not in removed for m in members[fam[d]]))
    return {"pairs_at_threshold": len(pairs), "caught": caught, "recall": caught / max(len(pairs), 1),
            "duplicate_removals": len(dup_removed), "correct": correct,
            "precision": correct / max(len(dup_removed), 1)}
