"""Downstream task data (mtnlg.tasks): readers by format, fixed-length features, the metrics (SQuAD's official
normalisation and max over gold answers, v2 HasAns/NoAns) and bad input, one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtnlg.data.wordpiece import train_wordpiece
from mtnlg.errors import UserError
from mtnlg.tasks.registry import TASKS, get_task
from mtnlg.tasks.squad import SpanExample, predict_answers
from mtnlg.tasks.squad import metric as squad_metric

CONTEXT = ("The quick brown fox jumps over the lazy dog near the river bank. It was seen on Monday by "
           "three children who were walking home from school with their teacher.")
TEXTS = [CONTEXT, "A cat sat on the mat.", "Is a fox quick?", "Who saw the fox?", "the dog is lazy",
         "entailment neutral contradiction", "What day was it?", "Where did the fox jump?"]


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(TEXTS * 3, 300)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _squad(tmp_path, qas, context=CONTEXT, name="squad.json"):
    return _write(tmp_path / name, json.dumps({"version": "v2.0", "data": [
        {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))


# --------------------------------------------------------------------------- the SQuAD metric


def test_squad_metric_hand_made_cases():
    ex = [
        SpanExample("norm", "q", "c", [("The Cat!", 0)]),                  # normalisation: case, punct, article
        SpanExample("multi", "q", "c", [("red fox", 0), ("a quick red fox", 0)]),  # several golds: the max
        SpanExample("part", "q", "c", [("big brown dog", 0)]),             # F1 of a partial overlap
        SpanExample("none-right", "q", "c", [], is_impossible=True),       # v2 no-answer, predicted empty
        SpanExample("none-wrong", "q", "c", [], is_impossible=True),       # v2 no-answer, something predicted
    ]
    pred = {"norm": "cat", "multi": "quick  red FOX.", "part": "the brown dog barked", "none-right": "",
            "none-wrong": "dog"}
    out = squad_metric(ex, pred)
    # part: gold {big, brown, dog}, predicted {brown, dog, barked}: P = R = 2/3, F1 = 2/3
    f1 = [1.0, 1.0, 2 / 3, 1.0, 0.0]
    assert out["exact"] == pytest.approx(100 * 3 / 5)
    assert out["f1"] == pytest.approx(100 * sum(f1) / 5)
    assert out["HasAns_total"] == 3 and out["HasAns_exact"] == pytest.approx(100 * 2 / 3)
    assert out["HasAns_f1"] == pytest.approx(100 * (2 + 2 / 3) / 3)
    assert out["NoAns_total"] == 2 and out["NoAns_exact"] == 50.0 and out["NoAns_f1"] == 50.0
    v1 = squad_metric(ex[:3], pred)  # v1.1: no HasAns/NoAns split
    assert set(v1) == {"exact", "f1", "total"} and v1["exact"] == pytest.approx(200 / 3)
    # an answer that normalises to nothing counts as no answer, as in the official script
    assert squad_metric([SpanExample("x", "q", "c", [("the", 0)])], {"x": ""})["exact"] == 100.0


def test_squad_windows_and_answers_round_trip(tmp_path, tok):
    start = CONTEXT.index("three children")
    path = _squad(tmp_path, [
        {"id": "q1", "question": "Who saw the fox?", "answers": [{"text": "three children", "answer_start": start}]},
        {"id": "q2", "question": "What day was it?", "answers": [], "is_impossible": True},
    ])
    task = get_task("squad")
    ex = task.read(path)
    f = task.features(ex, tok, 24, doc_stride=6)  # a context of ~35 pieces in windows of <= 24
    n = len(f["tokens"])
    assert n > 4 and f["tokens"].shape == (n, 24) and (f["example_index"][:-1] <= f["example_index"][1:]).all()
    hits = np.flatnonzero(f["start_position"] > 0)
    assert len(hits) >= 1 and set(f["example_index"][hits]) == {0}
    for h in hits:
        s, e = f["start_position"][h], f["end_position"][h]
        assert tok.decode(f["tokens"][h, s : e + 1]).replace(" ##", "") == "three children"
        assert (f["types"][h, s : e + 1] == 1).all()
    # logits that point at the gold span (and at [CLS] for the impossible question) give the answers back
    start_logits = np.full(f["tokens"].shape, -5.0)
    end_logits = np.full(f["tokens"].shape, -5.0)
    for k in range(n):
        if f["example_index"][k] == 0 and f["start_position"][k] > 0:
            start_logits[k, f["start_position"][k]] = end_logits[k, f["end_position"][k]] = 5.0
        if f["example_index"][k] == 1:
            start_logits[k, 0] = end_logits[k, 0] = 5.0
    pred = predict_answers(ex, f, start_logits, end_logits)
    assert pred == {"q1": "three children", "q2": ""}
    assert squad_metric(ex, pred)["exact"] == 100.0


# --------------------------------------------------------------------------- readers and features


def test_classification_readers_and_features(tmp_path, tok):
    mnli = _write(tmp_path / "dev_matched.tsv",  # columns by name, in any order, with extra ones
                  "index\tgenre\tsentence2\tsentence1\tlabel1\tgold_label\n"
                  "0\tfiction\tA cat sat.\tThe dog is lazy.\tneutral\tneutral\n"
                  "1\tfiction\tIs a fox quick?\tThe quick brown fox.\tentailment\tentailment\n")
    task = get_task("mnli")
    ex = task.read(mnli)
    assert [(e.text_a, e.text_b, e.label) for e in ex] == [("The dog is lazy.", "A cat sat.", "neutral"),
                                                           ("The quick brown fox.", "Is a fox quick?", "entailment")]
    f = task.features(ex, tok, 16)
    assert f["label"].tolist() == [2, 1] and f["tokens"].shape == (2, 16)
    assert f["tokens"][0, 0] == tok.cls_id and (f["types"][0] == 1).any()
    long = task.features(ex * 0 + [type(ex[0])("x", CONTEXT, CONTEXT, "neutral")], tok, 16)
    assert long["padding_mask"].sum() == 16 and (long["tokens"][0] == tok.sep_id).sum() == 2  # trimmed to fit
    qqp = _write(tmp_path / "qqp.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                 "1\t1\t2\tWho saw the fox?\tWho saw it?\t1\n2\t3\t4\tA cat?\tA dog?\t0\n3\t5\t6\tx\ty\t1\n")
    q = get_task("qqp")
    qex = q.read(qqp)
    scores = q.metric(qex, ["1", "1", "0"])  # tp 1, fp 1, fn 1
    assert scores["accuracy"] == pytest.approx(100 / 3) and scores["f1"] == pytest.approx(50.0)
    cls = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(x) for x in [
        {"text_a": "a cat", "label": "animal"}, {"text_a": "a mat", "text_b": "on it", "label": "thing"}]))
    c = get_task("classify")
    cex = c.read(cls)
    labels = c.label_names(cex)
    assert labels == ("animal", "thing") and c.features(cex, tok, 12, labels)["label"].tolist() == [0, 1]


def test_multiple_choice_readers_and_features(tmp_path, tok):
    item = {"id": "m1", "article": CONTEXT, "questions": ["Who saw the fox?", "The fox jumped over _ ."],
            "options": [["a cat", "three children", "a dog", "nobody"], ["a cat", "the dog", "a mat", "a bank"]],
            "answers": ["B", "B"]}
    _write(tmp_path / "race" / "dev" / "middle" / "1.txt", json.dumps(item))
    _write(tmp_path / "race" / "dev" / "high" / "2.txt", json.dumps({**item, "id": "h1"}))
    race = get_task("race")
    ex = race.read(tmp_path / "race" / "dev")
    assert [(e.group, e.label) for e in ex] == [("high", 1), ("high", 1), ("middle", 1), ("middle", 1)]
    f = race.features(ex, tok, 32)
    assert f["tokens"].shape == (4, 4, 32) and f["label"].tolist() == [1, 1, 1, 1]
    # the cloze question has its blank filled with each choice
    assert "the dog" in tok.decode(f["tokens"][1, 1][f["types"][1, 1] == 1])
    scores = race.metric(ex, [1, 0, 1, 1])
    assert scores["accuracy"] == 75.0 and scores["high_accuracy"] == 50.0 and scores["middle_accuracy"] == 100.0
    mc = _write(tmp_path / "mc.jsonl", json.dumps({"context": "c", "question": "q", "choices": ["a", "b", "c"],
                                                    "label": 2}))
    m = get_task("multiple-choice")
    assert m.features(m.read(mc), tok, 8)["tokens"].shape == (1, 3, 8)


# --------------------------------------------------------------------------- bad input, one line each


def test_bad_task_input_one_line_each(tmp_path, tok):
    cases = [
        (lambda: get_task("mnli").read(_write(tmp_path / "a.tsv", "premise\thypothesis\tlabel\nx\ty\tneutral\n")),
         "the header lacks columns sentence1, sentence2, gold_label"),
        (lambda: get_task("mnli").read(_write(tmp_path / "b.tsv", "sentence1\tsentence2\tgold_label\nx\ty\tmaybe\n")),
         "b.tsv:2: label 'maybe' is not one of mnli's labels"),
        (lambda: get_task("qqp").read(_write(tmp_path / "c.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                             "1\t1\t2\ta\tb\t2\n")), r"label '2' is not one of qqp's labels \(0, 1\)"),
        (lambda: get_task("squad").read(_squad(tmp_path, [{"id": "q", "question": "?", "answers": [
            {"text": "lazy dog", "answer_start": 3}]}])), "question q: answer_start 3 does not match its text"),
        (lambda: get_task("race").read(_write(tmp_path / "r.json", json.dumps(
            {"article": "a", "questions": ["q"], "options": [["1", "2", "3", "4"]], "answers": ["E"]}))),
         "answer 'E' is not one of A, B, C, D"),
        (lambda: get_task("squad").features(get_task("squad").read(_squad(tmp_path, [
            {"id": "long", "question": "Who?", "answers": [{"text": "three", "answer_start": CONTEXT.index("three")}]}
        ])), tok, 16, doc_stride=0),
         "the context of question long is .* tokens, longer than the 11 that seq_length 16 leaves; give a document"),
        (lambda: get_task("multiple-choice").read(_write(tmp_path / "m.jsonl", json.dumps(
            {"context": "c", "question": "q", "choices": ["a", "b"], "label": 2}))), "label 2 is not a choice index"),
        (lambda: get_task("glue"), "--task 'glue' is not a task; choose one of mnli, qqp, race, squad"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert set(TASKS) == {"mnli", "qqp", "race", "squad", "classify", "multiple-choice"}


# --------------------------------------------------------------------------- the offline demo set


def test_demo_tasks_writes_every_format_readably(tmp_path, tok, capsys):
    from mtnlg.cli import main

    out = tmp_path / "demo"
    assert main(["demo-tasks", "--output", str(out), "--limit-modules", "80", "--max-examples", "60"]) == 0
    printed = capsys.readouterr().out
    files = {"mnli": ["mnli/train.tsv", "mnli/dev_matched.tsv"], "qqp": ["qqp/train.tsv", "qqp/dev.tsv"],
             "race": ["race/train", "race/dev"], "squad": ["squad/train-v1.1.json", "squad/dev-v2.0.json"],
             "classify": ["classify/train.jsonl", "classify/dev.jsonl"],
             "multiple-choice": ["multiple-choice/train.jsonl", "multiple-choice/dev.jsonl"]}
    for name, (train_file, dev_file) in files.items():
        assert f"demo-tasks: {out / name}:" in printed
        task = get_task(name)
        train, dev = task.read(out / train_file), task.read(out / dev_file)  # the readers' checks pass
        assert len(train) >= 10 and len(dev) >= 2, name
        feats = task.features(dev, tok, 64, labels=task.label_names(train), **({"doc_stride": 32}
                                                                               if name == "squad" else {}))
        assert feats["tokens"].shape[-1] == 64
        if task.kind != "span":
            assert len(set(feats["label"].tolist())) >= 2, name  # more than one class / answer position
    assert any((out / "race" / "train").glob("*/0.txt"))
    v2 = get_task("squad").read(out / "squad" / "train-v2.0.json")
    assert any(e.is_impossible for e in v2) and any(not e.is_impossible for e in v2)
    # written again: same bytes (fixed seed), each task directory swapped in whole
    first = (out / "mnli" / "train.tsv").read_bytes()
    assert main(["demo-tasks", "--output", str(out), "--limit-modules", "80", "--max-examples", "60"]) == 0
    assert (out / "mnli" / "train.tsv").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_task_data_as_sample_sources(tmp_path, tok):
    from mtnlg.tasks.data import load_task_data

    train = _write(tmp_path / "train.jsonl", "\n".join(json.dumps({"text_a": t, "label": lab}) for t, lab in [
        ("a cat", "animal"), ("a dog", "animal"), ("a mat", "thing")]))
    dev = _write(tmp_path / "dev.jsonl", json.dumps({"text_a": "the fox", "label": "animal"}))
    data = load_task_data("classify", train, [dev], tok, 16)
    assert data.labels == ("animal", "thing") and len(data.train) == 3
    assert set(data.train[2]) == {"tokens", "types", "padding_mask", "label"} and data.train[2]["label"] == 1
    assert data.valid[0].source[0]["label"] == 0 and data.valid[0].examples[0].text_a == "the fox"
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text_a": "x", "label": "plant"}))
    with pytest.raises(UserError, match="bad.jsonl: label 'plant' is not among the training labels"):
        load_task_data("classify", train, [bad], tok, 16)
    start = CONTEXT.index("three children")
    squad = _squad(tmp_path, [{"id": "q", "question": "Who saw the fox?",
                               "answers": [{"text": "three children", "answer_start": start}]}])
    s = load_task_data("squad", squad, [squad], tok, 24, doc_stride=8)
    assert len(s.train) == len(s.valid[0].features["tokens"]) > 1
    assert set(s.train[0]) == {"tokens", "types", "padding_mask", "start_position", "end_position"}
