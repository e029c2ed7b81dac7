"""``mtnlg curate``: the run, in five phases, each resumable (a killed run redoes no finished shard).

1. shard: the driver streams the inputs (``mtnlg.data.readers``: what ``preprocess`` reads) into
   ``DIR/work/docs-NNNNN.jsonl`` shards of ``shard_docs`` documents with global ids.
2. map: per shard, a worker (this process, local processes, or datatrove's ``RayPipelineExecutor`` tasks on a
   Ray cluster, ``ray_map``) runs the per-document steps (``rules.Worker``); ``work/map-NNNNN.{npy,json}`` is
   written (the JSON last: it marks the shard done) by the driver for local workers, by the task itself on Ray
   (so a Ray run's output directory is on storage that every node sees).
3. reduce (driver): exact duplicates (first id kept), then MinHash LSH clusters over the survivors (``lsh``).
   Documents are ordered by id everywhere, so the decisions do not depend on workers, executor or timing.
4. write: ``kept/NNNNN.jsonl`` (``{"id", "text"}``, ready for ``mtnlg preprocess``) and
   ``removed/NNNNN.jsonl`` (``{"id", "step", "rule", "detail", "text"}``); with a tokenizer also
   ``tokens/curated.bin/.idx`` (``mtnlg.data.preprocess``).
5. report: ``report.json`` and ``report.md``: documents, characters, words and tokens before and after each
   step, removals per rule, C4 line removals, near-duplicate cluster sizes, the benchmarks matched, worker hosts.

Memory: the driver holds one shard of texts at a time; the reduce holds ids, 8-byte hashes and the MinHash
signatures of the documents that reach the near-duplicate step (num_perm x 4 bytes each), no texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.curate import lsh
from mtnlg.curate.config import CurateConfig
from mtnlg.curate.rules import ShardResult, benchmark_ngrams, run_shard, words
from mtnlg.data import readers
from mtnlg.errors import UserError

# row fields of a map result (see rules.ShardResult)
ID, CHARS, WORDS, TOKENS, STEP, RULE, DETAIL, HASH, NEW_TEXT, NEW_TOKENS = range(10)
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


class Run:
    """The paths of one curate output directory."""

    def __init__(self, output: str | Path):
        self.root = Path(output)
        self.work = self.root / "work"

    def docs(self, s: int) -> Path:
        return self.work / f"docs-{s:05d}.jsonl"

    def map_json(self, s: int) -> Path:
        return self.work / f"map-{s:05d}.json"

    def map_sig(self, s: int) -> Path:
        return self.work / f"map-{s:05d}.npy"

    def kept(self, s: int) -> Path:
        return self.root / "kept" / f"{s:05d}.jsonl"

    def removed(self, s: int) -> Path:
        return self.root / "removed" / f"{s:05d}.jsonl"


def fingerprint(paths: list[Path], cfg: CurateConfig, tokenizer_dir: str | None) -> str:
    """What makes two runs the same: inputs (path, size, mtime), the config and the tokenizer."""
    files = [(str(p.resolve()), readers.input_bytes(p), int(p.stat().st_mtime)) for p in paths]
    blob = json.dumps({"inputs": files, "config": cfg.to_dict(), "tokenizer": tokenizer_dir}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def curate(inputs: list[str | Path], output: str | Path, cfg: CurateConfig, workers: int = 1,
           ray_address: str | None = None, tokenizer_dir: str | None = None, log: Log | None = _stderr
           ) -> dict[str, Any]:
    """Curate ``inputs`` into ``output`` (see the module doc); returns the report."""
    log = log or (lambda _m: None)
    if workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    if "decontaminate" in cfg.steps and not cfg.decontaminate.benchmarks:
        raise UserError("the decontaminate step needs benchmarks: --benchmark NAME=FILE.jsonl (or "
                        "curate.decontaminate.benchmarks), or leave the step out with --steps")
    if ray_address is not None:
        check_reachable(ray_address)
    paths = readers.check_inputs(inputs, cfg.text_key)
    run = Run(output)
    key = fingerprint(paths, cfg, tokenizer_dir)
    _claim(run, key)
    t0 = time.perf_counter()
    n_shards, n_docs = _shard(paths, cfg, run, log)
    bench = benchmark_ngrams(cfg.decontaminate.benchmarks, cfg.decontaminate.ngram) \
        if "decontaminate" in cfg.steps else {}
    hosts = _map(run, n_shards, key, (cfg, bench, tokenizer_dir), workers, ray_address, log)
    t_map = time.perf_counter()
    decisions, report = _reduce(run, n_shards, cfg)
    _write(run, n_shards, decisions, log)
    if tokenizer_dir:
        _tokens(run, n_shards, tokenizer_dir, workers, log)
    report.update(documents=n_docs, shards=n_shards, workers=workers, executor="ray" if ray_address else "local",
                  hosts=hosts, seconds=round(time.perf_counter() - t0, 3), map_seconds=round(t_map - t0, 3),
                  config=cfg.to_dict())
    _atomic_write(run.root / "report.json", json.dumps(report, indent=1))
    _atomic_write(run.root / "report.md", format_report(report))
    log(f"curate: kept {report['kept']['docs']} of {n_docs} documents -> {run.root / 'kept'}; "
        f"removed -> {run.root / 'removed'}; report -> {run.root / 'report.md'}")
    return report


def _claim(run: Run, key: str) -> None:
    """Mark ``run.root`` as this run's; refuse a directory holding another run (other inputs or config)."""
    marker = run.root / "run.json"
    if marker.is_file():
        old = json.loads(marker.read_text()).get("fingerprint")
        if old != key:
            raise UserError(f"{run.root} holds a curate run of other inputs or settings; pass a new --output "
                            "(or delete that directory to start over)")
        return
    if run.root.exists() and any(run.root.iterdir()):
        raise UserError(f"{run.root} exists and is not a curate output; pass a new --output directory")
    for d in (run.work, run.root / "kept", run.root / "removed"):
        d.mkdir(parents=True, exist_ok=True)
    _atomic_write(marker, json.dumps({"fingerprint": key}))


# --------------------------------------------------------------------------- 1. shard


def _shard(paths: list[Path], cfg: CurateConfig, run: Run, log: Log) -> tuple[int, int]:
    marker = run.work / "sharded.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        return done["shards"], done["documents"]
    n, batch, s = 0, [], 0

    def flush() -> None:
        nonlocal batch, s
        if not run.docs(s).is_file():  # a resumed run does not rewrite a finished shard
            _atomic_write(run.docs(s), "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in batch))
        batch, s = [], s + 1

    for text in readers.iter_documents(paths, cfg.text_key):
        batch.append((n, text))
        n += 1
        if len(batch) == cfg.shard_docs:
            flush()
            if s % 50 == 0:
                log(f"curate: sharded {n} documents")
    if batch:
        flush()
    if n == 0:
        raise UserError(f"no documents in {', '.join(map(str, paths))}; check the files and --json-key")
    _atomic_write(marker, json.dumps({"shards": s, "documents": n}))
    log(f"curate: {n} documents in {s} shards of <= {cfg.shard_docs}")
    return s, n


def read_docs(path: Path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        return [(d["id"], d["text"]) for d in map(json.loads, f)]


# --------------------------------------------------------------------------- 2. map


def write_map(run: Run, s: int, res: ShardResult) -> None:
    """A shard's result: signatures, then the JSON (written last, it marks the shard done)."""
    tmp = run.map_sig(s).with_name(f".{run.map_sig(s).stem}.tmp{os.getpid()}.npy")
    np.save(tmp, res.signatures)
    os.replace(tmp, run.map_sig(s))
    _atomic_write(run.map_json(s), json.dumps({"rows": res.rows, "line_stats": res.line_stats, "host": res.host}))


def _map(run: Run, n_shards: int, key: str, state: tuple, workers: int, ray_address: str | None,
         log: Log) -> dict[str, int]:
    todo = [s for s in range(n_shards) if not run.map_json(s).is_file()]
    if len(todo) < n_shards:
        log(f"curate: resuming: {n_shards - len(todo)} of {n_shards} shards already done")
    if todo and ray_address:
        from mtnlg.curate.ray_map import ray_map

        t0 = time.perf_counter()
        ray_map(run.root, todo, key, state, ray_address, log)
        docs = sum(len(json.loads(run.map_json(s).read_text())["rows"]) for s in todo)
        dt = time.perf_counter() - t0
        log(f"curate: map {len(todo)}/{len(todo)} shards, {docs} docs, {docs / max(dt, 1e-9):.0f} docs/s")
    elif todo:
        t0, docs = time.perf_counter(), 0
        for k, (s, res) in enumerate(_local_map(run, todo, key, state, workers), 1):
            write_map(run, s, res)
            docs += len(res.rows)
            dt = time.perf_counter() - t0
            log(f"curate: map {k}/{len(todo)} shards, {docs} docs, {docs / max(dt, 1e-9):.0f} docs/s")
    hosts: Counter = Counter()
    for s in range(n_shards):
        hosts[json.loads(run.map_json(s).read_text())["host"]] += 1
    return dict(sorted(hosts.items()))


_POOL_STATE: tuple = ()


def _pool_init(key: str, state: tuple) -> None:
    global _POOL_STATE
    _POOL_STATE = (key, state)


def _pool_task(args: tuple[int, str]) -> tuple[int, ShardResult]:
    s, path = args
    return s, run_shard(_POOL_STATE[0], _POOL_STATE[1], read_docs(Path(path)))


def _local_map(run: Run, todo: list[int], key: str, state: tuple, workers: int
               ) -> Iterator[tuple[int, ShardResult]]:
    if workers == 1:
        for s in todo:
            yield s, run_shard(key, state, read_docs(run.docs(s)))
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers, _pool_init, (key, state)) as pool:
        yield from pool.imap_unordered(_pool_task, [(s, str(run.docs(s))) for s in todo])


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A Ray address is HOST:PORT of a running head (its GCS); one clear line when nothing answers there."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: expected HOST:PORT of a Ray head (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one there with "
                        "`ray start --head --port PORT` or fix --ray") from None


# --------------------------------------------------------------------------- 3. reduce


def _empty_stats() -> dict[str, int]:
    return {"docs": 0, "chars": 0, "words": 0, "tokens": 0}


def _add(stats: dict[str, int], row: list, text_changed: bool) -> None:
    stats["docs"] += 1
    if text_changed:
        stats["chars"] += len(row[NEW_TEXT])
        stats["words"] += len(words(row[NEW_TEXT]))
        stats["tokens"] += row[NEW_TOKENS] or 0
    else:
        stats["chars"] += row[CHARS]
        stats["words"] += row[WORDS]
        stats["tokens"] += row[TOKENS] or 0


def _reduce(run: Run, n_shards: int, cfg: CurateConfig) -> tuple[dict[int, tuple[str, str, str | None]], dict]:
    """Removal decisions {doc id: (step, rule, detail)} and the report's figures."""
    decisions: dict[int, tuple[str, str, str | None]] = {}
    line_stats: Counter = Counter()
    first_of_hash: dict[str, int] = {}
    survivors_ids, survivors_sigs = [], []
    for s in range(n_shards):
        m = json.loads(run.map_json(s).read_text())
        line_stats.update(m["line_stats"])
        sigs = np.load(run.map_sig(s), mmap_mode="r") if "near" in cfg.steps else None
        keep_rows = []
        for i, row in enumerate(m["rows"]):
            if row[STEP] is not None:
                decisions[row[ID]] = (row[STEP], row[RULE], row[DETAIL])
                continue
            if "exact" in cfg.steps:
                first = first_of_hash.setdefault(row[HASH], row[ID])
                if first != row[ID]:
                    decisions[row[ID]] = ("exact", "exact_duplicate", f"of document {first}")
                    continue
            keep_rows.append(i)
        if sigs is not None and keep_rows:
            survivors_ids.append(np.array([m["rows"][i][ID] for i in keep_rows], dtype=np.int64))
            survivors_sigs.append(np.asarray(sigs[keep_rows]))
    near: dict[str, Any] = {}
    if "near" in cfg.steps:
        bands, rows = (cfg.near.bands, cfg.near.rows) if cfg.near.bands else \
            lsh.choose_bands(cfg.near.threshold, cfg.near.num_perm)
        min_est = lsh.verify_threshold(cfg.near.threshold, cfg.near.num_perm)
        groups, seen, rejected = lsh.clusters(zip(survivors_ids, survivors_sigs), bands, rows, min_est)
        sizes = Counter(groups.values())
        for doc_id, root in groups.items():
            if doc_id != root:
                decisions[doc_id] = ("near", "near_duplicate", f"cluster of document {root} ({sizes[root]} docs)")
        near = {"threshold": cfg.near.threshold, "bands": bands, "rows": rows, "num_perm": cfg.near.num_perm,
                "ngram": cfg.near.ngram, "candidate_check_min_estimate": round(min_est, 4),
                "p_candidate_at_threshold": round(lsh.candidate_probability(cfg.near.threshold, bands, rows), 4),
                "candidate_pairs": seen, "candidates_rejected": rejected, "clusters": len(sizes),
                "cluster_sizes": {str(k): v for k, v in sorted(Counter(sizes.values()).items())}}
    report = _figures(run, n_shards, cfg, decisions)
    report["c4_line_removals"] = dict(sorted(line_stats.items()))
    report["near"] = near
    return decisions, report


def _figures(run: Run, n_shards: int, cfg: CurateConfig, decisions: dict) -> dict[str, Any]:
    """Documents, characters, words and tokens before and after each step, and removals per rule."""
    steps = cfg.steps
    before = {st: _empty_stats() for st in steps}
    rules: dict[str, Counter] = {st: Counter() for st in steps}
    benchmarks: Counter = Counter()
    inputs, kept = _empty_stats(), _empty_stats()
    for s in range(n_shards):
        for row in json.loads(run.map_json(s).read_text())["rows"]:
            _add(inputs, row, False)
            gone = decisions.get(row[ID])
            for st in steps:
                # quality sees the input text; later steps the text the C4 line rules left
                _add(before[st], row, st != "quality" and row[NEW_TEXT] is not None)
                if gone is not None and gone[0] == st:
                    rules[st][gone[1]] += 1
                    if st == "decontaminate":
                        benchmarks[gone[2]] += 1
                    break
            else:
                _add(kept, row, row[NEW_TEXT] is not None)
    table = []
    for i, st in enumerate(steps):
        after = before[steps[i + 1]] if i + 1 < len(steps) else kept
        table.append({"step": st, "before": before[st], "after": after, "removed_by_rule": dict(rules[st])})
    return {"input": inputs, "kept": kept, "steps": table, "benchmarks_matched": dict(benchmarks)}


# --------------------------------------------------------------------------- 4. write


def _write(run: Run, n_shards: int, decisions: dict, log: Log) -> None:
    for s in range(n_shards):
        if run.kept(s).is_file() and run.removed(s).is_file():
            continue
        rows = {r[ID]: r for r in json.loads(run.map_json(s).read_text())["rows"]}
        kept, removed = [], []
        for doc_id, text in read_docs(run.docs(s)):
            gone = decisions.get(doc_id)
            if gone is None:
                new = rows[doc_id][NEW_TEXT]
                kept.append(json.dumps({"id": doc_id, "text": text if new is None else new}) + "\n")
            else:
                removed.append(json.dumps({"id": doc_id, "step": gone[0], "rule": gone[1], "detail": gone[2],
                                           "text": text}) + "\n")
        _atomic_write(run.removed(s), "".join(removed))
        _atomic_write(run.kept(s), "".join(kept))
    log(f"curate: wrote {n_shards} kept and removed shards")


def _tokens(run: Run, n_shards: int, tokenizer_dir: str, workers: int, log: Log) -> None:
    from mtnlg.data.indexed import exists
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import load_tokenizer

    prefix = run.root / "tokens" / "curated"
    if exists(prefix):
        return
    kept = [run.kept(s) for s in range(n_shards) if run.kept(s).stat().st_size]
    if not kept:
        raise UserError("no documents were kept; nothing to tokenize")
    preprocess(kept, "text", load_tokenizer(tokenizer_dir), prefix, workers=workers, log=log)


# --------------------------------------------------------------------------- 5. report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"# curate report\n\n{r['documents']} documents in {r['shards']} shards; executor {r['executor']}, "
             f"hosts {r['hosts']}; {r['seconds']} s\n",
             "| step | docs before | docs after | chars before | chars after | words after | tokens after | "
             "removed by rule |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in r["steps"]:
        b, a = t["before"], t["after"]
        by_rule = ", ".join(f"{k}: {v}" for k, v in sorted(t["removed_by_rule"].items())) or "-"
        lines.append(f"| {t['step']} | {b['docs']} | {a['docs']} | {b['chars']} | {a['chars']} | {a['words']} | "
                     f"{a['tokens']} | {by_rule} |")
    lines.append(f"\nkept: {r['kept']}\n")
    if r["c4_line_removals"]:
        lines.append(f"C4 line rules (lines, and characters removed from kept documents): {r['c4_line_removals']}\n")
    if r["near"]:
        lines.append(f"near duplicates: {r['near']}\n")
    if r["benchmarks_matched"]:
        lines.append(f"decontamination, documents removed per benchmark: {r['benchmarks_matched']}\n")
    return "\n".join(lines)
