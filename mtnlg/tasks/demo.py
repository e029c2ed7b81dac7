"""An offline demonstration set for every task format, built from the Python standard library's docstrings
(parsed with ``ast``, nothing imported, as the default corpus ``mtnlg.data.corpus`` is), so that the BERT
fine-tuning workflow runs on a fresh machine. Each task's files are in its real format:

- ``mnli/{train,dev_matched}.tsv``: premise ``def f(a, b=1): summary``; hypothesis "f has a parameter named
  a." (entailment: a is in the signature), "f has a parameter named z." (contradiction: the signature lists
  every parameter and z is not one), "g has a parameter named a." (neutral: the premise says nothing of g).
- ``qqp/{train,dev}.tsv``: two sentences of docstrings; duplicate (1) when both come from the same docstring,
  0 when the second comes from another function of the same module.
- ``race/{train,dev}/{middle,high}/N.txt``: article = a module's documentation (as in the corpus); question
  "Which function does the documentation describe with: <summary>?", options 4 function names; ``high``
  draws the wrong options from the same module, ``middle`` from other modules.
- ``squad/{train,dev}-v1.1.json`` and ``-v2.0.json``: context = a function's signature and docstring;
  "What is the default value of b in f?" answered by the span of b's default in the signature; v2 adds the
  same question about a parameter without a default (is_impossible).
- ``classify/{train,dev}.jsonl``: two function summaries, label ``same-module`` or ``other-module``.
- ``multiple-choice/{train,dev}.jsonl``: context = a docstring, "Which function does this docstring
  describe?", choices = 4 signatures of one module, label = the right one's index.

Train and dev are split by module (a fixed hash of its name), so dev asks about functions never seen in
training. Every set is capped (``max_examples``) and drawn with a fixed seed: same Python, same files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtnlg.data.corpus import stdlib_files
from mtnlg.errors import UserError
from mtnlg.files import atomic_dir

DEV_PERCENT = 15
MAX_SIGNATURE = 160
_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class Function:
    module: str
    name: str
    signature: str  # def name(args):
    params: list[str]
    defaults: dict[str, str]  # parameter -> its default's source text
    doc: str  # the cleaned docstring, whitespace collapsed
    sentences: list[str]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _functions(path: Path, root: Path) -> list[Function]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        signature = f"def {node.name}({ast.unparse(node.args)}):"
        if not doc or len(signature) > MAX_SIGNATURE:
            continue
        a = node.args
        positional = [*a.posonlyargs, *a.args]
        defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]],
                            [ast.unparse(d) for d in a.defaults]))
        defaults.update({k.arg: ast.unparse(d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
        params = [p.arg for p in [*positional, *a.kwonlyargs]]
        text = _one_line(doc)
        sentences = [s for s in _SENTENCES.split(text) if 12 <= len(s) <= 200]
        if not sentences:
            continue
        out.append(Function(module, node.name, signature, params, defaults, text[:600], sentences))
    return out


def is_dev(module: str, percent: int = DEV_PERCENT) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 100 < percent


# --------------------------------------------------------------------------- one builder per format


def _mnli(funcs: list[Function], rng: np.random.RandomState) -> list[dict]:
    rows = []
    every_param = sorted({p for f in funcs for p in f.params})
    for f in funcs:
        if not f.params:
            continue
        premise = f"{f.signature} {f.sentences[0]}"
        label = ["entailment", "contradiction", "neutral"][rng.randint(3)]
        if label == "entailment":
            hyp = f"{f.name} has a parameter named {rng.choice(f.params)}."
        elif label == "contradiction":
            absent = [p for p in every_param if p not in f.params]
            hyp = f"{f.name} has a parameter named {absent[rng.randint(len(absent))]}."
        else:
            other = funcs[rng.randint(len(funcs))]
            if other.name == f.name:
                continue
            hyp = f"{other.name} has a parameter named {rng.choice(f.params)}."
        rows.append({"genre": f.module, "sentence1": premise, "sentence2": hyp, "gold_label": label})
    return rows


def _qqp(funcs: list[Function], rng: np.random.RandomState) -> list[dict]:
    by_module: dict[str, list[Function]] = {}
    for f in funcs:
        by_module.setdefault(f.module, []).append(f)
    rows = []
    for f in funcs:
        same = rng.random_sample() < 0.5
        if same and len(f.sentences) >= 2:
            i, j = rng.choice(len(f.sentences), 2, replace=False)
            a, b = f.sentences[i], f.sentences[j]
        else:
            others = [g for g in by_module[f.module] if g.name != f.name]
            if not others:
                continue
            same = False
            g = others[rng.randint(len(others))]
            a, b = f.sentences[0], g.sentences[rng.randint(len(g.sentences))]
        rows.append({"qid1": f"{f.module}.{f.name}", "qid2": "", "question1": a, "question2": b,
                     "is_duplicate": str(int(same))})
    return rows


def _race(funcs: list[Function], rng: np.random.RandomState) -> list[tuple[str, dict]]:
    by_module: dict[str, list[Function]] = {}
    for f in funcs:
        by_module.setdefault(f.module, []).append(f)
    names = sorted({f.name for f in funcs})
    items = []
    for module, fs in sorted(by_module.items()):
        fs = fs[:8]
        if len(fs) < 4:
            continue
        article = f"{module}\n\n" + "\n\n".join(f"{f.signature}\n    {f.doc}" for f in fs)
        level = "high" if rng.random_sample() < 0.5 else "middle"
        questions, options, answers = [], [], []
        for f in fs[:4]:
            if level == "high":
                wrong = [g.name for g in fs if g.name != f.name]
            else:
                wrong = [n for n in names if n not in {g.name for g in fs}]
            picks = [wrong[k] for k in rng.choice(len(wrong), 3, replace=False)]
            right = int(rng.randint(4))
            picks.insert(right, f.name)
            questions.append(f"Which function does the documentation describe with: {f.sentences[0]}")
            options.append(picks)
            answers.append("ABCD"[right])
        items.append((level, {"id": module, "article": article, "questions": questions, "options": options,
                              "answers": answers}))
    return items


def _squad(funcs: list[Function], rng: np.random.RandomState, v2: bool) -> list[dict]:
    paragraphs = []
    for f in funcs:
        context = f"{f.signature}\n{f.doc}"
        qas = []
        with_default = [p for p in f.params if p in f.defaults]
        for p in with_default[:2]:
            value = f.defaults[p]
            start = f.signature.find(f"{p}={value}")
            if start < 0:
                continue
            start += len(p) + 1
            qas.append({"id": f"{f.module}.{f.name}.{p}", "question": f"What is the default value of {p} in "
                        f"{f.name}?", "answers": [{"text": value, "answer_start": start}], "is_impossible": False})
        without = [p for p in f.params if p not in f.defaults and p not in ("self", "cls")]
        if v2 and without and rng.random_sample() < 0.5:
            p = without[rng.randint(len(without))]
            qas.append({"id": f"{f.module}.{f.name}.{p}", "question": f"What is the default value of {p} in "
                        f"{f.name}?", "answers": [], "is_impossible": True})
        if qas:
            if not v2:
                for q in qas:
                    q.pop("is_impossible")
            paragraphs.append({"context": context, "qas": qas})
    return paragraphs


def _classify(funcs: list[Function], rng: np.random.RandomState) -> list[dict]:
    by_module: dict[str, list[Function]] = {}
    for f in funcs:
        by_module.setdefault(f.module, []).append(f)
    rows = []
    for f in funcs:
        same = rng.random_sample() < 0.5
        pool = [g for g in by_module[f.module] if g.name != f.name] if same else \
            [funcs[k] for k in rng.randint(0, len(funcs), 4) if funcs[k].module != f.module]
        if not pool:
            continue
        g = pool[rng.randint(len(pool))]
        rows.append({"text_a": f.sentences[0], "text_b": g.sentences[0],
                     "label": "same-module" if same else "other-module"})
    return rows


def _multiple_choice(funcs: list[Function], rng: np.random.RandomState) -> list[dict]:
    by_module: dict[str, list[Function]] = {}
    for f in funcs:
        by_module.setdefault(f.module, []).append(f)
    rows = []
    for f in funcs:
        others = [g.signature for g in by_module[f.module] if g.name != f.name]
        if len(others) < 3:
            continue
        choices = [others[k] for k in rng.choice(len(others), 3, replace=False)]
        label = int(rng.randint(4))
        choices.insert(label, f.signature)
        rows.append({"context": f.doc, "question": "Which function does this docstring describe?",
                     "choices": choices, "label": label})
    return rows


# --------------------------------------------------------------------------- writing


def _tsv(rows: list[dict], columns: list[str]) -> str:
    """GLUE's layout: a header row, tab-separated fields, no quoting (fields are one line without tabs)."""
    lines = ["\t".join(columns)] + ["\t".join(_one_line(str(r.get(c, ""))) for c in columns) for r in rows]
    return "".join(line + "\n" for line in lines)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _cap(rows: list, limit: int, rng: np.random.RandomState) -> list:
    if len(rows) <= limit:
        return rows
    keep = np.sort(rng.choice(len(rows), limit, replace=False))
    return [rows[k] for k in keep]


def write_demo_tasks(output: str | Path, root: str | Path | None = None, limit_modules: int | None = None,
                     max_examples: int = 2000, seed: int = 1234) -> dict[str, dict[str, int]]:
    """Write every task's demo files under ``output`` (one directory per task, each swapped in whole);
    returns the example counts per task and split."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    funcs = [f for p in stdlib_files(root)[:limit_modules] for f in _functions(p, root)]
    if not funcs:
        raise UserError(f"no documented functions found under {root}")
    splits = {"train": [f for f in funcs if not is_dev(f.module)], "dev": [f for f in funcs if is_dev(f.module)]}
    if not splits["dev"] or not splits["train"]:
        raise UserError("too few stdlib modules for a train and a dev split; raise --limit-modules")
    output = Path(output)
    counts: dict[str, dict[str, int]] = {}
    caps = {"train": max_examples, "dev": max(max_examples // 5, 1)}

    def task(name: str, write: Callable[[Path, str, list[Function], np.random.RandomState], int]) -> None:
        with atomic_dir(output / name) as tmp:
            counts[name] = {}
            for split, fs in splits.items():
                rng = np.random.RandomState([seed, len(name), split == "dev"])
                counts[name][split] = write(tmp, split, fs, rng)

    def mnli(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        rows = _cap(_mnli(fs, rng), caps[split], rng)
        for k, r in enumerate(rows):
            r["index"] = k
        name = "train.tsv" if split == "train" else "dev_matched.tsv"
        (d / name).write_text(_tsv(rows, ["index", "genre", "sentence1", "sentence2", "gold_label"]))
        return len(rows)

    def qqp(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        rows = _cap(_qqp(fs, rng), caps[split], rng)
        for k, r in enumerate(rows):
            r["id"], r["qid1"], r["qid2"] = k, 2 * k, 2 * k + 1
        (d / f"{split}.tsv").write_text(_tsv(rows, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]))
        return len(rows)

    def race(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        items = _cap(_race(fs, rng), max(caps[split] // 4, 1), rng)
        for k, (level, item) in enumerate(items):
            (d / split / level).mkdir(parents=True, exist_ok=True)
            (d / split / level / f"{k}.txt").write_text(json.dumps(item, ensure_ascii=False))
        return sum(len(item["questions"]) for _, item in items)

    def squad(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        n = 0
        for v2 in (False, True):
            paragraphs = _cap(_squad(fs, rng, v2), max(caps[split] // 2, 1), rng)
            version = "v2.0" if v2 else "1.1"
            doc = {"version": version, "data": [{"title": "python-stdlib", "paragraphs": paragraphs}]}
            (d / f"{split}-v{version.lstrip('v')}.json").write_text(json.dumps(doc, ensure_ascii=False))
            n += sum(len(p["qas"]) for p in paragraphs)
        return n

    def classify(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        rows = _cap(_classify(fs, rng), caps[split], rng)
        (d / f"{split}.jsonl").write_text(_jsonl(rows))
        return len(rows)

    def multiple_choice(d: Path, split: str, fs: list[Function], rng: np.random.RandomState) -> int:
        rows = _cap(_multiple_choice(fs, rng), caps[split], rng)
        (d / f"{split}.jsonl").write_text(_jsonl(rows))
        return len(rows)

    try:
        for name, write in [("mnli", mnli), ("qqp", qqp), ("race", race), ("squad", squad), ("classify", classify),
                            ("multiple-choice", multiple_choice)]:
            task(name, write)
    except OSError as e:
        raise UserError(f"cannot write the demo tasks under {output} ({e.strerror or e})") from None
    return counts
