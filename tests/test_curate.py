"""``mtnlg curate``: a planted corpus (precision and recall of duplicate removal, every planted low-quality rule, a
planted 13-gram leak), each quality rule at its published threshold (just passing, just failing), decontamination
at 12 vs 13 shared words, resume after a kill, local processes and a Ray cluster on two simulated hosts giving the
output of one process (through datatrove's Ray executor), and bad input (one line each)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from mtnlg.cli import main
from mtnlg.curate.config import CurateConfig, parse
from mtnlg.curate.pipeline import curate
from mtnlg.curate.planted import LOW_QUALITY, planted_corpus, score, synthetic_background
from mtnlg.curate.rules import Worker, benchmark_ngrams
from mtnlg.errors import UserError
from tests.dist_helper import skip_unless_required
from tests.hosts import SimHosts, ensure_packages, why_unavailable

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def outputs(out: Path) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    """(kept id -> text, removed id -> (step, rule)) of a curate output directory."""
    kept, removed = {}, {}
    for f in sorted((out / "kept").glob("*.jsonl")):
        for d in map(json.loads, f.read_text().splitlines()):
            kept[d["id"]] = d["text"]
    for f in sorted((out / "removed").glob("*.jsonl")):
        for d in map(json.loads, f.read_text().splitlines()):
            removed[d["id"]] = (d["step"], d["rule"])
    return kept, removed


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted corpus, its truth, a benchmark file leaking one document's 13-gram, and one curate run."""
    work = tmp_path_factory.mktemp("curate")
    background = synthetic_background(150, seed=1)
    docs, truth = planted_corpus(background, exact=15, near=30, low=2 * len(LOW_QUALITY), seed=2)
    leak = docs.index(background[7])
    leaked = " ".join(background[7].split()[40:53])  # 13 words from the middle of a document
    bench = work / "lambada.jsonl"
    bench.write_text(json.dumps({"context": f"Once upon a time {leaked}", "target": "end"}) + "\n"
                     + json.dumps({"context": "an unrelated example of a benchmark", "target": "here"}) + "\n")
    inp = write_jsonl(work / "corpus.jsonl", docs)
    cfg = parse({"shard_docs": 40, "decontaminate": {"benchmarks": {"lambada": str(bench)}}})
    report = curate([inp], work / "out", cfg, workers=1, log=None)
    holders = sum(1 for d in docs if leaked in " ".join(d.split()))  # the document and its copies
    return {"work": work, "docs": docs, "truth": truth, "leak": leak, "holders": holders, "input": inp, "cfg": cfg,
            "report": report, "out": work / "out"}


def test_planted_corpus_precision_recall_rules_and_leak(planted):
    kept, removed = outputs(planted["out"])
    docs, truth = planted["docs"], planted["truth"]
    assert sorted([*kept, *removed]) == list(range(len(docs)))  # every document is kept or removed with its rule
    s = score(truth, removed)
    assert s["pairs_at_threshold"] >= 30
    assert s["recall"] >= 0.95 and s["precision"] >= 0.99, s
    for low in truth["low"]:  # every planted low-quality document is removed by its rule
        assert removed[low["doc"]][0] == "quality" and removed[low["doc"]][1].endswith(":" + low["rule"]), low
    assert removed[planted["leak"]] == ("decontaminate", "ngram_overlap")
    r = planted["report"]
    assert r["benchmarks_matched"] == {"lambada": planted["holders"]}
    assert r["kept"]["docs"] == len(kept) and r["input"]["docs"] == len(docs)
    steps = {t["step"]: t for t in r["steps"]}
    assert list(steps) == ["quality", "decontaminate", "exact", "near"]
    for a, b in zip(r["steps"], r["steps"][1:]):  # each step starts where the one before ended
        assert a["after"] == b["before"]
    for t in r["steps"]:
        assert t["before"]["docs"] - t["after"]["docs"] == sum(t["removed_by_rule"].values())
    assert steps["exact"]["removed_by_rule"]["exact_duplicate"] >= 15
    assert sum(int(k) * v for k, v in r["near"]["cluster_sizes"].items()) - r["near"]["clusters"] == \
        steps["near"]["removed_by_rule"]["near_duplicate"]
    assert (r["near"]["bands"], r["near"]["rows"]) == (21, 6)
    assert "near" in (planted["out"] / "report.md").read_text()


# --------------------------------------------------------------------------- quality rules at their thresholds


def _words(n: int, length: int = 5, start: int = 0) -> list[str]:
    """``n`` distinct lower-case words of ``length`` letters."""
    out = []
    for i in range(start, start + n):
        w, k = "", i
        for _ in range(length):
            w, k = w + "bcdfghjklmnpqrstvwxz"[k % 20], k // 20
        out.append(w)
    return out


def _body(n: int) -> str:
    return " ".join(["the", "and", *_words(n - 2)])


def _lines(n: int, per: int = 6, end: str = ".", start: int = 0) -> list[str]:
    ws = _words(n * per, start=start)
    return [" ".join(["the", "and", *ws[i * per:(i + 1) * per]]) + end for i in range(n)]


def _avg(n11: int, n10: int) -> str:
    return " ".join(["the", "and", *_words(n11, 11), *_words(n10, 10, 500)])


def _symbols(sym: str, k: int) -> str:
    ws = _body(60).split()
    return " ".join([*ws[:30], *[sym] * k, *ws[30:]])


def _numbers(k: int) -> str:
    return " ".join([*_body(60).split(), *[str(100 + i) for i in range(k)]])


def _repeat_lines(dups: int) -> str:
    """10 lines of which ``dups`` repeat a short line (few characters, so only the line fraction is near its
    threshold)."""
    return "\n".join(_interleave(_lines(10 - dups, per=12), ["Some short words."] * (dups + 1)))


def _repeat_paras(dups: int) -> str:
    long = ["\n".join(_lines(2, per=12, start=24 * i)) for i in range(10 - dups)]
    return "\n\n".join(_interleave(long, ["Tiny para text."] * (dups + 1)))


def _interleave(a: list[str], b: list[str]) -> list[str]:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def _sentences(n: int) -> str:
    return "\n".join(_lines(n))


# (filter, passing document, failing document, the rule the failing one hits); thresholds are datatrove's defaults,
# the published ones (Gopher: Rae et al. 2021, appendix A; C4: Raffel et al. 2020, section 2.2)
QUALITY_CASES = {
    "min 50 words": ("gopher_quality", _body(50), _body(49), "gopher_short_doc"),
    "mean word length >= 3": ("gopher_quality", " ".join(["the", "and", *_words(58, 3)]),
                              " ".join(["the", "and", *_words(57, 3), "ab"]), "gopher_below_avg_threshold"),
    "mean word length <= 10": ("gopher_quality", _avg(14, 44), _avg(15, 43), "gopher_above_avg_threshold"),
    "hash/word <= 0.1": ("gopher_quality", _symbols("#", 6), _symbols("#", 7), "gopher_too_many_hashes"),
    "ellipsis/word <= 0.1": ("gopher_quality", _symbols("...", 6), _symbols("...", 7), "gopher_too_many_ellipsis"),
    "bullet lines <= 90%": ("gopher_quality", "\n".join(["- " + x for x in _lines(9)] + _lines(1)),
                            "\n".join("- " + x for x in _lines(10)), "gopher_too_many_bullets"),
    "ellipsis lines <= 30%": ("gopher_quality", "\n".join(_lines(3, end=" ...") + _lines(7)),
                              "\n".join(_lines(4, end=" ...") + _lines(6)), "gopher_too_many_end_ellipsis"),
    "alphabetic words >= 80%": ("gopher_quality", _numbers(15), _numbers(16), "gopher_below_alpha_threshold"),
    "2 stop words": ("gopher_quality", _body(60), " ".join(["the", *_words(59)]), "gopher_enough_stop_words"),
    "duplicate lines <= 30%": ("gopher_repetition", _repeat_lines(3), _repeat_lines(4), "dup_line_frac"),
    "duplicate paragraphs <= 30%": ("gopher_repetition", _repeat_paras(3), _repeat_paras(4), "dup_para_frac"),
    "min 5 sentences": ("c4", _sentences(5), _sentences(4), "too_few_sentences"),
    "no curly bracket": ("c4", _sentences(6), _sentences(6) + "\nThe value is {x} in this line.", "curly_bracket"),
    "no lorem ipsum": ("c4", _sentences(6), _sentences(6) + "\nLorem ipsum dolor sit amet.", "lorem_ipsum"),
}


def _only(name: str) -> CurateConfig:
    cfg = CurateConfig(steps=["quality"])
    cfg.quality = {k: ({} if k == name else None) for k in cfg.quality}
    return cfg


@pytest.fixture(scope="module")
def workers():
    return {name: Worker(_only(name), {}) for name in ("gopher_quality", "gopher_repetition", "c4")}


@pytest.mark.parametrize("case", list(QUALITY_CASES))
def test_quality_rule_at_its_threshold(case, workers):
    name, good, bad, rule = QUALITY_CASES[case]
    res = workers[name].run([(0, good), (1, bad)])
    assert res.rows[0][5] is None, (case, res.rows[0][5])
    assert res.rows[1][5] == f"{name}:{rule}"


def test_c4_line_rules_remove_lines_not_documents(workers):
    doc = "\n".join([*_lines(5), "no terminal punctuation here", "Two words.", "Please enable javascript to see it."])
    res = workers["c4"].run([(0, doc)])
    assert res.rows[0][5] is None and res.rows[0][8] == "\n".join(_lines(5))
    assert res.line_stats["line-filter-no_terminal_punc"] == 1 and res.line_stats["line-filter-too_few_words"] == 1
    assert res.line_stats["line-filter-javascript"] == 1


def test_decontamination_13_not_12_words(tmp_path):
    doc = _sentences(8)
    ws = doc.split()
    bench = write_jsonl(tmp_path / "b.jsonl", [], "context")
    bench.write_text(json.dumps({"context": " ".join(ws[10:23]), "choices": ["a", "b"], "label": 0}) + "\n"
                     + json.dumps({"context": "x " + " ".join(ws[30:42]) + " y", "choices": ["c"], "label": 0}) + "\n")
    grams = benchmark_ngrams({"piqa": str(bench)}, 13)
    w = Worker(CurateConfig(steps=["decontaminate"]), grams)
    res = w.run([(0, doc), (1, " ".join(ws[30:42]) + " " + _body(60))])
    assert res.rows[0][4:7] == ["decontaminate", "ngram_overlap", "piqa"]  # 13 shared words
    assert res.rows[1][4] is None  # 12 shared words


def test_decontamination_reads_the_downstream_tasks_own_files(tmp_path):
    """A benchmark named after a downstream task is read with that task's reader: a SQuAD JSON context and an MNLI
    TSV sentence leak into two documents, each removed and attributed; a JSONL benchmark stays JSONL."""
    ws = _sentences(12).split()
    context = " ".join(ws[:40])
    squad = tmp_path / "dev-v1.1.json"
    answer = {"text": ws[3], "answer_start": context.index(ws[3])}
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "which word?", "answers": [answer]}]}]}]}))
    mnli = tmp_path / "dev_matched.tsv"
    mnli.write_text("index\tsentence1\tsentence2\tgold_label\n0\t" + " ".join(ws[60:75]) + "\tA cat.\tneutral\n")
    grams = benchmark_ngrams({"squad": str(squad), "mnli-dev": str(mnli)}, 13)
    w = Worker(CurateConfig(steps=["decontaminate"]), grams)
    res = w.run([(0, _body(30) + " " + " ".join(ws[10:24])), (1, " ".join(ws[60:74]) + " " + _body(30)),
                 (2, _body(40))])
    assert res.rows[0][4:7] == ["decontaminate", "ngram_overlap", "squad"]
    assert res.rows[1][4:7] == ["decontaminate", "ngram_overlap", "mnli-dev"]
    assert res.rows[2][4] is None
    with pytest.raises(UserError, match="not JSON"):  # read as SQuAD, not as JSONL
        benchmark_ngrams({"squad": str(mnli)}, 13)


def test_tokenizer_counts_tokens_and_writes_bin_idx(tmp_path):
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.tokenizer import train_tokenizer

    docs = synthetic_background(12, seed=3)
    tok = train_tokenizer(docs, 300, tmp_path / "tok")
    inp = write_jsonl(tmp_path / "in.jsonl", [*docs, docs[0], _body(20)])
    report = curate([inp], tmp_path / "out", CurateConfig(steps=["quality", "exact"], shard_docs=5),
                    tokenizer_dir=str(tmp_path / "tok"), log=None)
    kept, _ = outputs(tmp_path / "out")
    assert report["kept"]["docs"] == len(kept) == 12
    assert report["kept"]["tokens"] == sum(len(tok.encode(kept[i])) for i in kept)
    assert report["input"]["tokens"] > report["kept"]["tokens"]
    ds = IndexedDataset(tmp_path / "out" / "tokens" / "curated")
    assert len(ds.doc_idx) - 1 == 12 and int(ds.sizes.sum()) == report["kept"]["tokens"] + 12  # + an EOD each


def test_parquet_input_with_a_named_column_equals_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = synthetic_background(6, seed=4)
    docs = [*docs, docs[2], _body(20)]
    pq.write_table(pa.table({"body": docs}), tmp_path / "in.parquet")
    write_jsonl(tmp_path / "in.jsonl", docs)
    for name in ("in.parquet", "in.jsonl"):
        cfg = CurateConfig(steps=["quality", "exact"], text_key="body" if name.endswith("parquet") else "text")
        curate([tmp_path / name], tmp_path / f"out-{name}", cfg, log=None)
    assert outputs(tmp_path / "out-in.parquet") == outputs(tmp_path / "out-in.jsonl")
    assert outputs(tmp_path / "out-in.jsonl")[1] == {6: ("exact", "exact_duplicate"),
                                                      7: ("quality", "gopher_quality:gopher_short_doc")}


# --------------------------------------------------------------------------- resume, local processes


def test_killed_run_resumes_without_redoing_shards(planted, tmp_path):
    out = tmp_path / "out"
    cmd = [str(BIN / "mtnlg"), "curate", "--input", str(planted["input"]), "--output", str(out), "--steps",
           "quality,exact,near", "--shard-docs", "12"]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith("curate: map 2/"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: p.stat().st_mtime_ns for p in (out / "work").glob("map-*.json")}
    n_shards = len(list((out / "work").glob("docs-*.jsonl")))
    assert 2 <= len(done) < n_shards
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(done)} of {n_shards} shards already done" in again.stderr
    assert again.stderr.count("curate: map ") == n_shards - len(done)
    for name, mtime in done.items():  # not redone
        assert (out / "work" / name).stat().st_mtime_ns == mtime
    # the same output as one uninterrupted run with two local worker processes
    ref = tmp_path / "ref"
    cfg = parse({"steps": ["quality", "exact", "near"], "shard_docs": 12})
    curate([planted["input"]], ref, cfg, workers=2, log=None)
    assert outputs(out) == outputs(ref)
    assert outputs(ref)[1]  # something was removed


# --------------------------------------------------------------------------- two Ray hosts


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head on host1 and a worker on host2 (simulated hosts: own network stack each), 1 CPU per node."""
    why = why_unavailable() or ensure_packages()
    if why:
        skip_unless_required(f"no simulated hosts: {why}")
    work = tmp_path_factory.mktemp("ray")
    hosts = SimHosts(2, work / "sim")
    hosts.up()
    # HOME and TMPDIR in the test's directory (datatrove's tasks log to TMPDIR/ray_logs). The cluster config Ray's
    # own launcher would write in HOME: with a provider named there, Ray's dashboard does not probe the cloud
    # metadata address (169.254.169.254) to name one
    (work / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    # RAY_worker_niceness: Ray runs its workers at nice 15, which on this shared 2-core machine left the tasks ~3% of
    # a core beside another test's ranks (a CI run timed out with both tasks still importing spaCy for the Gopher
    # filter); a Ray cluster of its own has no such neighbours
    env = {**ENV, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0", "HOME": str(work), "TMPDIR": str(work)}
    temp = f"/tmp/mtnlg-ray-{os.getpid()}"  # short: Ray's unix socket paths must fit in 107 bytes
    traces = [work / f"connect-{h}.strace" for h in hosts.names]
    try:
        head = f"{hosts.addr('host1')}:6379"
        for host, trace, extra in (("host1", traces[0], ["--head", "--port", "6379", "--include-dashboard=false"]),
                                   ("host2", traces[1], ["--address", head])):
            # --block: `ray start` stays, and with it the trace of every process it starts (connect() calls only)
            start = hosts.popen(host, [*traced(trace), str(BIN / "ray"), "start", "--block", *extra,
                                       "--node-ip-address", hosts.addr(host), "--num-cpus", "1",
                                       "--object-store-memory", str(80 << 20), "--disable-usage-stats",
                                       "--temp-dir", f"{temp}-{host}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            started, log = threading.Event(), []
            threading.Thread(target=_watch, args=(start, log, started), daemon=True).start()
            assert started.wait(180), "".join(log)[-2000:]
        yield hosts, head, env, traces
    finally:
        hosts.down()  # kills every process of each host, Ray's and the traces included
        for host in hosts.names:
            shutil.rmtree(f"{temp}-{host}", ignore_errors=True)


def _watch(proc: subprocess.Popen, log: list[str], started: threading.Event) -> None:
    """Collect ``ray start --block``'s output (draining the pipe) and say when the node runs."""
    for line in proc.stdout:
        log.append(line)
        if "Ray runtime started" in line:
            started.set()


def traced(path: Path) -> list[str]:
    """A command prefix that logs the connect() calls of a command and all its descendants to ``path`` (nothing
    when strace is not installed)."""
    if not shutil.which("strace"):
        return []
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(path)]


# Ray 2.60 looks for its node's address by a UDP connect() to Google's DNS (no packet is sent; in the simulated hosts
# it fails at once, ENETUNREACH) in `ray start` even when --node-ip-address is given (ray/scripts/scripts.py
# evaluates services.get_node_ip_address() as the default it then ignores) and in each node's runtime-env agent
# (ray.util.get_node_ip_address() in a process with no node); the address is fixed in Ray's C++ (network_util.cc),
# with no option to change or skip it.
RAY_ADDRESS_PROBE = {"8.8.8.8:53", "[2001:4860:4860::8888]:53"}


_V4 = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([0-9.]+)"\)')
_V6 = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')


def outside_addresses(traces: list[Path], net: str) -> set[str]:
    """The addresses (ADDR:PORT) that ``strace -e trace=connect`` logs show connect() calls to, outside ``net`` (a
    prefix, IPv4 or IPv4-mapped IPv6) and loopback."""
    found = set()
    for trace in traces:
        text = trace.read_text()
        found |= {f"{a}:{p}" for p, a in _V4.findall(text)} | {f"[{a}]:{p}" for p, a in _V6.findall(text)}
    local = (net, "127.", "0.0.0.0", "::1", "::ffff:127.", f"::ffff:{net}")
    return {a for a in found if not a.lstrip("[").startswith(local)}


def test_two_ray_hosts_equal_one_machine(planted, ray_cluster, tmp_path):
    """Through datatrove's RayPipelineExecutor: both hosts run tasks, the output equals one process's; the driver
    contacts only addresses the test assigned (its connections, traced when strace is here)."""
    hosts, head, env, traces = ray_cluster
    out = tmp_path / "ray"
    driver_trace = tmp_path / "connect-driver.strace"
    proc = hosts.popen("host1", [*traced(driver_trace), str(BIN / "mtnlg"), "curate", "--input",
                                 str(planted["input"]), "--output", str(out), "--shard-docs", "40", "--ray", head,
                                 "--benchmark", f"lambada={planted['work'] / 'lambada.jsonl'}"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "datatrove tasks on the Ray cluster" in log
    assert (out / "work" / "ray-logs" / "executor.json").is_file()  # datatrove's executor ran the shards
    report = json.loads((out / "report.json").read_text())
    assert set(report["hosts"]) == {"host1", "host2"} and report["executor"] == "ray"  # both hosts did shards
    assert outputs(out) == outputs(planted["out"])
    strip = ("seconds", "map_seconds", "hosts", "executor", "workers")
    assert {k: v for k, v in report.items() if k not in strip} == \
        {k: v for k, v in planted["report"].items() if k not in strip}
    if traced(driver_trace):  # every process of the cluster and the driver contacted only the hosts' addresses
        time.sleep(1)  # the traces of the tasks' processes are written as they end
        for trace in [*traces, driver_trace]:
            assert "htons(6379)" in trace.read_text()  # each trace saw its process's connections to the head
        assert outside_addresses([*traces, driver_trace], "198.18.0.") <= RAY_ADDRESS_PROBE
    else:
        warnings.warn("strace not installed: the connections were not checked", stacklevel=1)


# --------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("mtnlg curate: error: "), err
    return err


def test_bad_input_one_line_each(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_background(3))
    not_jsonl = tmp_path / "notes.jsonl"
    not_jsonl.write_text("this is not JSON\n")
    no_text = write_jsonl(tmp_path / "body.jsonl", ["a b c"], key="body")
    base = ["curate", "--steps", "quality,exact,near"]
    assert "notes.jsonl:1: malformed JSON" in _one_line_error(
        capsys, [*base, "--input", str(not_jsonl), "--output", str(tmp_path / "o1")])
    assert "no key 'text'" in _one_line_error(
        capsys, [*base, "--input", str(no_text), "--output", str(tmp_path / "o2")])
    assert "outside (0.0, 1.0]" in _one_line_error(
        capsys, [*base, "--input", str(good), "--output", str(tmp_path / "o3"), "--threshold", "1.5"])
    yaml = tmp_path / "c.yaml"
    yaml.write_text("curate:\n  near: {threshold: 0}\n")
    assert "curate.near.threshold = 0" in _one_line_error(
        capsys, [*base, "--input", str(good), "--output", str(tmp_path / "o4"), "--config", str(yaml)])
    yaml.write_text("curate:\n  quality: {gopher_quality: {min_doc_wrds: 5}}\n")
    assert "unknown key 'min_doc_wrds'" in _one_line_error(
        capsys, [*base, "--input", str(good), "--output", str(tmp_path / "o5"), "--config", str(yaml)])
    t0 = time.perf_counter()
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in _one_line_error(
        capsys, [*base, "--input", str(good), "--output", str(tmp_path / "o6"), "--ray", "127.0.0.1:9"])
    assert time.perf_counter() - t0 < 10
    assert "needs benchmarks" in _one_line_error(capsys, ["curate", "--input", str(good), "--output",
                                                          str(tmp_path / "o7")])
    assert main([*base, "--input", str(good), "--output", str(tmp_path / "o8")]) == 0
    capsys.readouterr()
    assert "other inputs or settings" in _one_line_error(  # a directory of another run is not overwritten
        capsys, [*base, "--input", str(good), "--output", str(tmp_path / "o8"), "--threshold", "0.9"])
