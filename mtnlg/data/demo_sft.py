"""An offline fine-tuning demonstration set: prompt/response pairs derived from the Python standard library.

Every stdlib function or method with a docstring (parsed with ``ast``, nothing imported, as for the default
corpus ``mtnlg.data.corpus``) gives four examples about its signature::

    {"prompt": "# json\\ndef dumps(obj, *, skipkeys=False, ...):\\nName:",       "response": " dumps", "kind": "name"}
    {"prompt": "...\\nParameters:",           "response": " obj, skipkeys, ...",        "kind": "params"}
    {"prompt": "...\\nNumber of parameters:", "response": " 11",                        "kind": "count"}
    {"prompt": "...\\nSummary:",              "response": " Serialize ``obj`` to a JSON formatted ``str``.",
                                                                                         "kind": "summary"}

The first three can be read off the signature, so a model can learn them and answer unseen functions
exactly (held-out exact match measures that); the summary (the docstring's first sentence) is the issue's
example of a free-text answer. A function belongs to the held-out split when a hash of its prompt header
says so (``heldout_percent``), so both files are the same for every run on the same Python.

    python -m mtnlg.data.demo_sft --output data/demo_sft [--limit-modules N]
    # -> data/demo_sft/train.jsonl, data/demo_sft/heldout.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from mtnlg.data.corpus import stdlib_files
from mtnlg.errors import UserError
from mtnlg.files import write_atomic

KINDS = ("name", "params", "count", "summary")
HELDOUT_PERCENT = 10
MAX_SIGNATURE_CHARS = 160  # longer signatures are skipped: the demo keeps examples short
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence (its first paragraph, cut after the first '.', '!' or '?'), one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = _SENTENCE.match(para)
    sentence = m.group(1) if m else para
    return sentence if 3 <= len(sentence) <= 160 else None


def _param_names(args: ast.arguments) -> list[str]:
    every = [*args.posonlyargs, *args.args, *([args.vararg] if args.vararg else []), *args.kwonlyargs,
             *([args.kwarg] if args.kwarg else [])]
    return [a.arg for a in every]


def _functions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef]]:
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node


def module_examples(path: Path, root: Path) -> Iterator[dict]:
    """The examples of one stdlib module, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return
    module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    for qualname, node in _functions(tree.body):
        doc = ast.get_docstring(node, clean=True)
        summary = first_sentence(doc) if doc else None
        signature = f"def {qualname}({ast.unparse(node.args)}):"
        if summary is None or len(signature) > MAX_SIGNATURE_CHARS:
            continue
        header = f"# {module}\n{signature}\n"
        names = _param_names(node.args)
        answers = {"name": node.name, "params": ", ".join(names) or "none", "count": str(len(names)),
                   "summary": summary}
        questions = {"name": "Name:", "params": "Parameters:", "count": "Number of parameters:",
                     "summary": "Summary:"}
        for kind in KINDS:
            text = f"{header}{questions[kind]}"
            yield {"prompt": text, "response": f" {answers[kind]}", "kind": kind, "function": f"{module}.{qualname}"}


def is_heldout(function: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether a function's examples are held out: a fixed hash of its dotted name, so the split is stable."""
    return int(hashlib.sha256(function.encode()).hexdigest()[:8], 16) % 100 < percent


def build_examples(root: str | Path | None = None, limit_modules: int | None = None) -> list[dict]:
    """Every example of the stdlib under ``root`` (the running Python's by default), deduplicated by prompt."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out = []
    for path in stdlib_files(root)[:limit_modules]:
        for ex in module_examples(path, root):
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(ex)
    return out


def write_demo_sft(output: str | Path, root: str | Path | None = None, limit_modules: int | None = None,
                   heldout_percent: int = HELDOUT_PERCENT) -> dict:
    """Write ``output/train.jsonl`` and ``output/heldout.jsonl`` (atomically); returns counts per split and kind."""
    examples = build_examples(root, limit_modules)
    if not examples:
        raise UserError(f"no documented functions found under {root or sysconfig.get_paths()['stdlib']}")
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for ex in examples:
        splits["heldout" if is_heldout(ex["function"], heldout_percent) else "train"].append(ex)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, rows in splits.items():
        write_atomic(output / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        stats[name] = {"examples": len(rows), **{k: sum(r["kind"] == k for r in rows) for k in KINDS}}
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtnlg.data.demo_sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/train.jsonl and DIR/heldout.jsonl")
    p.add_argument("--limit-modules", type=int, default=None, help="only the first N stdlib modules (sorted)")
    p.add_argument("--heldout-percent", type=int, default=HELDOUT_PERCENT)
    args = p.parse_args(argv)
    stats = write_demo_sft(args.output, limit_modules=args.limit_modules, heldout_percent=args.heldout_percent)
    for name, s in stats.items():
        print(f"demo-sft: {Path(args.output) / (name + '.jsonl')}: " + ", ".join(f"{v:,} {k}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
