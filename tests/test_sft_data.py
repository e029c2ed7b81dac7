"""Fine-tuning data and packed documents, in one process: the demo set, ``preprocess --sft`` (masks, chats,
over-long examples, bad input), SFT samples (shift inside each example, packing), and packed documents in the
model (plain forward, learned and rotary positions, the KV cache) equal to each document alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mtnlg.data.tokenizer import train_tokenizer

    text = ["def add(a, b):\n    Return a plus b.", "<|user|>\nhello there\n<|assistant|>\nhi, how are you"] * 20
    return train_tokenizer(iter(text), 300, tmp_path_factory.mktemp("tok") / "tok")


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_demo_set_is_deterministic_and_split_by_function(tmp_path):
    from mtnlg.data.demo_sft import KINDS, write_demo_sft

    a = write_demo_sft(tmp_path / "a", limit_modules=15)
    write_demo_sft(tmp_path / "b", limit_modules=15)
    for name in ("train", "heldout"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    rows = {n: [json.loads(x) for x in (tmp_path / "a" / f"{n}.jsonl").read_text().splitlines()]
            for n in ("train", "heldout")}
    assert a["heldout"]["examples"] > 0 and a["train"]["examples"] > 5 * a["heldout"]["examples"]
    assert not {r["function"] for r in rows["train"]} & {r["function"] for r in rows["heldout"]}
    assert {r["kind"] for r in rows["train"]} == set(KINDS)
    count = next(r for r in rows["train"] if r["kind"] == "count")
    params = next(r for r in rows["train"] if r["kind"] == "params" and r["function"] == count["function"])
    assert int(count["response"]) == len(params["response"].split(","))


def test_prompt_response_mask_covers_response_and_eod(tmp_path, tok):
    from mtnlg.data.sft import load_sft, preprocess_sft

    src = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "def add(a, b):", "response": " Return a plus b."}])
    stats = preprocess_sft([src], tok, tmp_path / "x", log=lambda _m: None)
    tokens, mask = load_sft(tmp_path / "x")
    ids, m = tokens[0].tolist(), mask[0].tolist()
    n_prompt = len(tok.encode("def add(a, b):"))
    assert ids == tok.encode("def add(a, b):") + tok.encode(" Return a plus b.") + [tok.eod_id]
    assert m == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert stats.loss_tokens == len(ids) - n_prompt


def test_chat_default_template_masks_assistant_turns(tmp_path, tok):
    from mtnlg.data.sft import load_sft, preprocess_sft

    chat = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
                         {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}
    preprocess_sft([write_jsonl(tmp_path / "c.jsonl", [chat])], tok, tmp_path / "c", log=lambda _m: None)
    tokens, mask = load_sft(tmp_path / "c")
    ids, m = tokens[0], mask[0].astype(bool)
    assert tok.decode(ids.tolist()) == ("<|user|>\nhello there\n<|assistant|>\nhi<|endoftext|><|user|>\nhow are you\n"
                                        "<|assistant|>\nfine<|endoftext|>")
    assert tok.decode(ids[m].tolist()) == "hi<|endoftext|>fine<|endoftext|>"


def test_over_long_examples_truncated_or_dropped_and_counted(tmp_path, tok):
    from mtnlg.data.sft import load_sft, preprocess_sft

    rows = [{"prompt": "a", "response": " b"}, {"prompt": "a", "response": " Return a plus b." * 12},
            {"prompt": "def add(a, b): " * 9, "response": " b"}]
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    cut = preprocess_sft([src], tok, tmp_path / "t", max_length=24, overflow="truncate", log=lambda _m: None)
    assert (cut.examples, cut.truncated, cut.dropped) == (2, 1, 1)  # the third keeps no response token
    assert load_sft(tmp_path / "t")[0].sizes.max() == 24
    drop = preprocess_sft([src], tok, tmp_path / "d", max_length=24, overflow="drop", log=lambda _m: None)
    assert (drop.examples, drop.truncated, drop.dropped) == (1, 0, 2)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a"}', 'expected string fields "prompt" and "response"'),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, tok, line, message):
    src = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": " b"}', line])
    tok.save(tmp_path / "tok")
    r = subprocess.run([sys.executable, "-m", "mtnlg", "preprocess", "--sft", "--input", src, "--tokenizer",
                        str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    errors = [x for x in r.stderr.splitlines() if "error" in x]
    assert r.returncode != 0 and len(errors) == 1 and message in errors[0] and f"{src}:2" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))  # nothing half-written left


def test_samples_shift_inside_examples_and_pack_whole_examples(tmp_path, tok):
    from mtnlg.data.sft import preprocess_sft
    from mtnlg.data.sft_dataset import SFTDataset

    rows = [{"prompt": f"def add(a, b): {i}", "response": " Return a plus b." * (1 + i % 3)} for i in range(12)]
    preprocess_sft([write_jsonl(tmp_path / "s.jsonl", rows)], tok, tmp_path / "s", log=lambda _m: None)
    plain = SFTDataset(tmp_path / "s", 64, seed=3, packing=False, num_samples=12)
    packed = SFTDataset(tmp_path / "s", 64, seed=3, packing=True, num_samples=12)
    assert sorted(e for r in plain.rows for e in r) == list(range(12))  # one epoch, one example per row
    assert max(len(r) for r in packed.rows) > 1
    for ds in (plain, packed):
        for i in range(len(ds)):
            s = ds[i]
            assert s.loss_mask.sum() == ds.loss_tokens(i)
            for seg, e in enumerate(ds.rows[i]):
                ex = ds.tokens[e].astype(np.int64)
                at = np.flatnonzero(s.segment_ids == seg)
                assert np.array_equal(s.input_ids[at], ex[:-1]) and np.array_equal(s.labels[at], ex[1:])
                assert np.array_equal(s.loss_mask[at], ds.mask[e][1:])
            pad = s.segment_ids == len(ds.rows[i])
            assert not s.loss_mask[pad].any()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_documents_equal_each_alone(arch):
    """Plain forward and the KV cache: a packed document's logits equal its own; decoding continues it."""
    from mtnlg.model import GPTModel

    torch.manual_seed(0)
    m = GPTModel.from_config({"architecture": arch, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                              "vocab_size": 50, "seq_length": 24}).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 9))
    seg = torch.tensor([[0] * 7 + [1] * 9])
    packed = m((torch.cat([a, b], 1), seg))
    torch.testing.assert_close(packed[:, :7], m(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], m(b), rtol=0, atol=1e-5)
    assert (m(torch.cat([a, b], 1))[:, 7:] - m(b)).abs().max() > 1e-3  # without segments b sees a
    cache = m.new_cache(1, 24)
    prefill = m.forward_cached(torch.cat([a, b], 1), cache, segment_ids=seg)
    torch.testing.assert_close(prefill[:, 7:], m(b), rtol=0, atol=1e-5)
    nxt = torch.tensor([[3]])
    torch.testing.assert_close(m.forward_cached(nxt, cache)[:, -1], m(torch.cat([b, nxt], 1))[:, -1],
                               rtol=0, atol=1e-5)


def test_sft_config_needs_a_tokenizer_and_one_source():
    from mtnlg.config import ConfigError, from_dict, resolve

    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 50, "seq_length": 16}
    with pytest.raises(ConfigError, match="data.sft needs the tokenizer"):
        resolve(from_dict({"model": model, "data": {"sft": {"prefix": "x"}}}), 1)
    with pytest.raises(ConfigError, match="not prefix and sft"):
        resolve(from_dict({"model": model, "data": {"prefix": "y", "sft": {"prefix": "x"}, "tokenizer": "t"}}), 1)
    assert resolve(from_dict({"model": model, "data": {"sft": {"prefix": "x"}, "tokenizer": "t"}}), 1).data.sft


def test_generate_match_scores_greedy_answers(tok):
    """Rows whose response is the model's own greedy answer (up to surrounding whitespace) match; others do not."""
    from mtnlg.eval.generate import Generator
    from mtnlg.eval.generate_match import generate_match
    from mtnlg.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel.from_config({"architecture": "llama", "num_layers": 2, "hidden_size": 32,
                                  "num_attention_heads": 4, "vocab_size": tok.vocab_size, "seq_length": 32}).eval()
    gen = Generator(model, tok.encode, tok.decode, tok.eod_id, 1 << 30)
    prompts = ["def add(a, b):", "hello there", "Return a plus b."]
    outs = gen.generate_ids([tok.encode(p) for p in prompts], 6)
    got = [tok.decode([t for t in ids if t != tok.eod_id]) for ids in outs]
    rows = [{"prompt": prompts[0], "response": got[0], "kind": "x"},
            {"prompt": prompts[1], "response": got[1] + " extra", "kind": "x"},
            {"prompt": prompts[2], "response": "  " + got[2].strip() + "\n", "kind": "y"}]
    r = generate_match(gen, rows, tok.eod_id, max_new_tokens=6, batch_size=2)
    assert (r["matched"], r["examples"]) == (2, 3)
    assert r["by_kind"] == {"x": {"exact_match": 0.5, "examples": 2}, "y": {"exact_match": 1.0, "examples": 1}}


def test_generate_match_chat_prompt_is_the_trained_prefix(tmp_path, tok):
    """A chat row's prompt is the text preprocess --sft put before the last answer (default template)."""
    from mtnlg.data.sft import render_chat
    from mtnlg.eval.generate_match import prompt_and_answer

    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    ids, mask = render_chat(tok, msgs)
    last = len(mask) - 1 - mask[::-1].index(0)  # the last token outside the loss
    prompt, answer = prompt_and_answer({"messages": msgs}, "row 1", tok.encode, tok.eod_id)
    assert prompt == ids[: last + 1] and answer == "fine"


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_packed_documents_under_recompute(recompute):
    """Selective and full recompute carry the segment ids: the packed batch's loss and gradients equal the sum of
    each document's computed alone, in a row of its own, without recompute (the loss is a weighted token sum)."""
    from mtnlg.model import GPTModel

    cfg = {"architecture": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 50,
           "seq_length": 24}
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 50, (2, 16), generator=g), torch.randint(0, 50, (2, 16), generator=g)
    seg = torch.tensor([[0] * 7 + [1] * 9, [0] * 10 + [1] * 6])
    weights = torch.rand(2, 16, generator=g)

    m = GPTModel.from_config({**cfg, "recompute": recompute}, seed=3).train()
    loss = m((ids, seg), (labels, weights))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters()])

    alone = GPTModel.from_config({**cfg, "recompute": "none"}, seed=3).train()
    ref_loss = 0.0
    for b in range(2):
        for s in seg[b].unique():
            span = (seg[b] == s).nonzero().flatten()
            lo, hi = int(span[0]), int(span[-1]) + 1
            doc = alone(ids[b:b + 1, lo:hi], (labels[b:b + 1, lo:hi], weights[b:b + 1, lo:hi]))
            doc.backward()
            ref_loss = ref_loss + doc.detach()
    ref_grads = torch.cat([p.grad.flatten() for p in alone.parameters()])
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-7)


def test_chat_template_of_the_tokenizer_is_used(tmp_path, tok):
    """A tokenizer with a chat template renders the chat; the assistant contents (what the template writes
    after the generation prompt) are in the loss, the template's headers are not."""
    from mtnlg.data.sft import render_chat
    from mtnlg.data.tokenizer import load_tokenizer

    tok.save(tmp_path / "tok")
    templated = load_tokenizer(str(tmp_path / "tok"))
    templated.hf.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }};{% endfor %}"
                                  "{% if add_generation_prompt %}[assistant]{% endif %}")
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    ids, mask = render_chat(templated, msgs)
    assert templated.decode(ids) == "[user]hello there;[assistant]hi;[user]how are you;[assistant]fine;"
    assert templated.decode([i for i, m in zip(ids, mask) if m]) == "hi;fine;"
