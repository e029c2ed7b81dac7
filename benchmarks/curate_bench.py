"""Measure ``mtnlg curate`` (issue 30): a corpus from this Python's standard-library docstrings with planted exact and
near duplicates, planted low-quality documents and a planted 13-gram leak; precision and recall of duplicate
removal against the ground truth, each quality rule's hits, the leak caught; then throughput with 1 and 2 workers
side by side with datatrove's own pipeline doing the same steps (Gopher quality, Gopher repetition, C4, MinHash
dedup) on the same corpus, alternating rounds (the machine may be shared), and what each pipeline keeps compared
document by document (``kept_difference``).

    python benchmarks/curate_bench.py --docs 600 --rounds 3 --out benchmarks/results/curate

Writes OUT/curate_bench.json and OUT/curate_bench.md and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mtnlg.curate.config import parse
from mtnlg.curate.pipeline import curate
from mtnlg.curate.planted import LOW_QUALITY, planted_corpus, score, stdlib_background
from mtnlg.curate.rules import Worker, shingles, words

DATATROVE = "datatrove LocalPipelineExecutor"


def removed_of(out: Path) -> dict[int, tuple[str, str]]:
    removed = {}
    for f in sorted((out / "removed").glob("*.jsonl")):
        for d in map(json.loads, f.read_text().splitlines()):
            removed[d["id"]] = (d["step"], d["rule"])
    return removed


def datatrove_run(inputs: Path, work: Path, workers: int) -> float:
    """datatrove's own pipeline for quality + MinHash dedup (its LocalPipelineExecutor, tasks = workers); seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    # the banding mtnlg picks for 0.8; sha1 shingle hashes: datatrove 0.10.1's xxhash path passes str, which
    # xxhash 4 refuses ("Strings must be encoded before hashing")
    mh = MinhashConfig(n_grams=5, num_buckets=21, hashes_per_bucket=6, seed=1,
                       hash_config=HashConfig(precision=64, hash_fc="sha1"))
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    common = {"workers": workers, "skip_completed": False, "start_method": "fork"}
    stage1 = LocalPipelineExecutor([JsonlReader(str(inputs)), GopherQualityFilter(), GopherRepetitionFilter(),
                                    C4QualityFilter(), JsonlWriter(str(work / "filtered")),
                                    MinhashDedupSignature(str(work / "sigs"), config=mh)],
                                   tasks=workers, logging_dir=str(work / "logs1"), **common)
    stage2 = LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mh)],
                                   tasks=mh.num_buckets, logging_dir=str(work / "logs2"), depends=stage1, **common)
    stage3 = LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=mh)],
                                   tasks=1, logging_dir=str(work / "logs3"), depends=stage2, **common)
    stage4 = LocalPipelineExecutor([JsonlReader(str(work / "filtered")), MinhashDedupFilter(str(work / "remove")),
                                    JsonlWriter(str(work / "kept"))],
                                   tasks=workers, logging_dir=str(work / "logs4"), depends=stage3, **common)
    stage4.run()
    return time.perf_counter() - t0


def _ids(folder: Path) -> set[int]:
    """The ids of the documents in a folder of JSONL(.gz) shards (datatrove keeps the ``id`` it read)."""
    return {int(json.loads(line)["id"]) for f in folder.glob("*.jsonl*") for line in _lines(f)}


def kept_difference(docs: list[str], mt: Path, dt: Path, threshold: float) -> dict:
    """The documents that one pipeline keeps and the other does not, and why. For a document ``i`` that pipeline A
    keeps and B removed as a duplicate, ``j`` is the document most similar to it (exact word 5-gram Jaccard, mtnlg's
    normalisation) among those B kept: when A removed ``j``, both joined the pair and keep different members (a swap,
    counted); when A kept ``j`` too, only B joined them (listed, with their Jaccard)."""
    mt_kept = {d["id"] for f in (mt / "kept").glob("*.jsonl") for d in map(json.loads, f.read_text().splitlines())}
    mt_removed = {d["id"]: d for f in (mt / "removed").glob("*.jsonl")
                  for d in map(json.loads, f.read_text().splitlines())}
    dt_passed, dt_kept = _ids(dt / "filtered"), _ids(dt / "kept")
    quality = sorted(i for i in range(len(docs))
                     if (i in dt_passed) != (mt_removed.get(i, {}).get("step") != "quality"))
    sets = {i: shingles(words(docs[i]), 5) for i in mt_kept | dt_kept}
    swaps, swaps_below, details = 0, 0, []
    for i in sorted((mt_kept ^ dt_kept) - set(quality)):
        keeper, remover = ("mtnlg", "datatrove") if i in mt_kept else ("datatrove", "mtnlg")
        keeper_kept, remover_kept = (mt_kept, dt_kept) if i in mt_kept else (dt_kept, mt_kept)
        mine = shingles(words(docs[i]), 5)
        best, j = max(((len(mine & sets[k]) / len(mine | sets[k]), k) for k in remover_kept if k != i),
                      default=(0.0, None))
        if j is not None and j not in keeper_kept:
            swaps += 1
            swaps_below += best < threshold
            continue
        details.append({"doc": i, "removed_by": remover if remover == "datatrove" else
                        f"mtnlg ({mt_removed[i]['detail']})", "most_similar_kept_by_both": j,
                        "jaccard": round(best, 3), "why": f"only {remover} joins them"})
    return {"mtnlg_kept": len(mt_kept), "datatrove_kept": len(dt_kept), "kept_by_both": len(mt_kept & dt_kept),
            "only_mtnlg": len(mt_kept - dt_kept), "only_datatrove": len(dt_kept - mt_kept),
            "quality_verdicts_differ": quality, "swapped_members": swaps,
            f"swapped_members_with_jaccard_below_{threshold}": swaps_below, "joined_by_one_pipeline": details}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=2000, help="background documents (default 2000)")
    p.add_argument("--out", default="benchmarks/results/curate")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of the 4 throughput runs (default 2)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="curate-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    background = stdlib_background(args.docs)
    n = len(background)
    docs, truth = planted_corpus(background, exact=n // 10, near=n // 5, low=6 * len(LOW_QUALITY), seed=0)
    # the leak: 13 words of the first background document that passes the quality rules (one they remove would
    # be counted there, not as a leak)
    gate = Worker(parse({"steps": ["quality"]}), {})
    source = next(d for d in background if gate.run([(0, d)]).rows[0][4] is None)
    leaked = " ".join(source.split()[30:43])
    bench = work / "lambada.jsonl"
    bench.write_text(json.dumps({"context": f"The passage reads: {leaked}", "target": "end"}) + "\n")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    split = work / "split"  # the same corpus in 2 files: datatrove gives each task whole files
    split.mkdir()
    for k in range(2):
        (split / f"part{k}.jsonl").write_text("".join(json.dumps({"text": d, "id": str(i)}) + "\n"
                                                      for i, d in enumerate(docs) if i % 2 == k))
    result: dict = {"corpus": {"documents": len(docs), "background": n, "planted_exact": n // 10,
                               "planted_near": n // 5, "planted_low_quality": 6 * len(LOW_QUALITY),
                               "source": "Python standard-library docstrings, one sentence per line"},
                    "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}

    # quality of the removals: every step
    cfg = parse({"shard_docs": 500, "decontaminate": {"benchmarks": {"lambada": str(bench)}}})
    report = curate([corpus], work / "all", cfg, workers=1, log=None)
    removed = removed_of(work / "all")
    s = score(truth, removed)
    leak_doc = docs.index(source)
    result["dedup"] = s
    result["quality_rule_hits"] = next(t["removed_by_rule"] for t in report["steps"] if t["step"] == "quality")
    planted_low_caught = sum(1 for x in truth["low"] if removed.get(x["doc"], ("",))[0] == "quality")
    result["planted_low_quality_caught"] = f"{planted_low_caught}/{len(truth['low'])}"
    result["leak_caught"] = removed.get(leak_doc) == ("decontaminate", "ngram_overlap")
    result["benchmarks_matched"] = report["benchmarks_matched"]
    result["near"] = report["near"]
    result["jaccard_of_planted_near_copies"] = {
        "min": round(min(c["jaccard"] for c in truth["copies"] if c["kind"] != "exact"), 3),
        "at_or_above_0.8": sum(1 for c in truth["copies"] if c["kind"] != "exact" and c["jaccard"] >= 0.8)}

    # throughput, same steps (quality + near dedup), 1 and 2 workers, side by side; the machine is shared, so the
    # four runs alternate, `--rounds` times, and each row keeps its fastest round (the one least slowed by others)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for workers in (1, 2):
            cfg = parse({"steps": ["quality", "near"], "shard_docs": 250})
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            shutil.rmtree(work / f"mtnlg-w{workers}", ignore_errors=True)
            rep = curate([corpus], work / f"mtnlg-w{workers}", cfg, workers=workers, log=None)
            runs.setdefault(("mtnlg curate", workers), []).append(
                _timed(time.perf_counter() - t0, load0, rep["kept"]["docs"]))
            load0 = os.getloadavg()[0]
            dt = datatrove_run(split, work / f"datatrove-w{workers}", workers)
            kept = sum(1 for f in (work / f"datatrove-w{workers}" / "kept").glob("*.jsonl*") for _ in _lines(f))
            runs.setdefault((DATATROVE, workers), []).append(_timed(dt, load0, kept))
    rows = []
    for (name, workers), tries in runs.items():
        best = min(tries, key=lambda t: t["seconds"])
        rows.append({**_row(name, workers, best["seconds"], len(docs), best["kept"]),
                     "rounds_seconds": [t["seconds"] for t in tries], "load_at_start": [t["load"] for t in tries]})
    for name in ("mtnlg curate", DATATROVE):
        one, two = (r for r in rows if r["pipeline"] == name)
        two["scaling_vs_1_worker"] = round(one["seconds"] / two["seconds"], 2)
    rows.sort(key=lambda r: (r["workers"], r["pipeline"] != "mtnlg curate"))
    result["throughput"] = rows
    result["mtnlg_vs_datatrove_docs_per_s"] = {
        str(w): round(next(r["docs_per_s"] for r in rows if r["pipeline"] == "mtnlg curate" and r["workers"] == w)
                      / next(r["docs_per_s"] for r in rows if r["pipeline"] == DATATROVE and r["workers"] == w), 2)
        for w in (1, 2)}
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine during the run
    result["kept_difference"] = kept_difference(docs, work / "mtnlg-w1", work / "datatrove-w1",
                                                parse({"steps": ["near"]}).near.threshold)
    (out / "curate_bench.json").write_text(json.dumps(result, indent=1))
    md = format_md(result)
    (out / "curate_bench.md").write_text(md)
    print(md)
    return 0


def _timed(seconds: float, load: float, kept: int) -> dict:
    return {"seconds": seconds, "load": round(load, 1), "kept": kept}


def _row(name: str, workers: int, seconds: float, docs: int, kept: int) -> dict:
    return {"pipeline": name, "workers": workers, "seconds": round(seconds, 2), "docs_per_s": round(docs / seconds, 1),
            "docs_per_s_per_worker": round(docs / seconds / workers, 1), "kept": kept}


def _lines(path: Path):
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        yield from (line for line in f if line.strip())


def format_md(r: dict) -> str:
    d = r["dedup"]
    out = [f"# mtnlg curate benchmark\n\ncorpus: {r['corpus']}\n",
           f"duplicate removal: recall {d['recall']:.3f} ({d['caught']}/{d['pairs_at_threshold']} planted pairs with "
           f"word 5-gram Jaccard >= 0.8), precision {d['precision']:.3f} ({d['correct']}/{d['duplicate_removals']} "
           "removals)\n",
           f"planted near copies: {r['jaccard_of_planted_near_copies']}\n",
           f"near-duplicate LSH: {r['near']}\n",
           f"quality rule hits: {r['quality_rule_hits']}; "
           f"planted low-quality caught {r['planted_low_quality_caught']}\n",
           f"13-gram leak caught: {r['leak_caught']} (benchmarks matched: {r['benchmarks_matched']})\n",
           f"throughput (quality + MinHash near dedup, same corpus; {r['cpu_count']} CPU cores, a machine shared "
           f"with other jobs: 1-min load average at each run's start in the last column, "
           f"{r.get('load_average_1min_at_end', '?')} at the end; each row the fastest of its rounds):\n",
           "| pipeline | workers | seconds | docs/s | docs/s per worker | scaling 1 -> 2 | kept | rounds (s) | load |",
           "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for t in r["throughput"]:
        out.append(f"| {t['pipeline']} | {t['workers']} | {t['seconds']} | {t['docs_per_s']} | "
                   f"{t['docs_per_s_per_worker']} | {t.get('scaling_vs_1_worker', '-')} | {t['kept']} | "
                   f"{t.get('rounds_seconds', '-')} | {t.get('load_at_start', '-')} |")
    out.append(f"\nmtnlg / datatrove docs/s, by workers: {r.get('mtnlg_vs_datatrove_docs_per_s')}\n")
    k = r.get("kept_difference")
    if k:
        below = next(v for key, v in k.items() if key.startswith("swapped_members_with"))
        out.append(f"kept (quality + near, 1 worker): mtnlg {k['mtnlg_kept']}, datatrove {k['datatrove_kept']}, both "
                   f"{k['kept_by_both']}; only mtnlg {k['only_mtnlg']}, only datatrove {k['only_datatrove']}. Quality "
                   f"verdicts that differ: {k['quality_verdicts_differ'] or 'none'}. {k['swapped_members']} of the "
                   f"differing documents are swaps (both pipelines join the pair and keep different members; {below} "
                   "of them pairs below the threshold by exact Jaccard); joined by one pipeline only:\n")
        out += ["| doc | removed by | the most similar document, kept by both | Jaccard | why |",
                "|---:|---|---:|---:|---|"]
        out += [f"| {d['doc']} | {d['removed_by']} | {d['most_similar_kept_by_both']} | {d['jaccard']} | {d['why']} |"
                for d in k["joined_by_one_pipeline"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
