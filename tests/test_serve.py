"""`mtnlg serve` driven live with the real `openai` client on 127.0.0.1: a tiny random Llama (its own BPE and a chat
template) imported as an mtnlg checkpoint and exported back to HF. One server proves the API, continuous
batching (64 concurrent requests each get the tokens they get alone), bad requests, a client leaving mid-stream,
a full queue, lm-eval's `local-completions` and, last, the SIGTERM drain; a tp=2 server under torchrun answers as
the tp=1 one does."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORDS = "apple banana cherry dragon eagle falcon grape hazel iris jasmine kiwi lemon mango nectar olive pepper".split()
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
CONTEXT = 256
BATCH, QUEUE = 64, 8
NAME = "tiny"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """tokenizer -> random HF Llama (GQA, chat template) -> mtnlg checkpoint (import-hf) -> HF export (export-hf)."""
    import transformers

    from mtnlg.convert.hf_export import export_hf
    from mtnlg.convert.hf_import import import_hf
    from mtnlg.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("serve")
    docs = [" ".join(WORDS[(i + k) % 16] for k in range(20 + i % 7)) + f" number {i}." for i in range(200)]
    tok = train_tokenizer(docs, 300, d / "tok")
    tok.hf.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=len(tok.hf), max_position_embeddings=CONTEXT, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eod_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "src")
    tok.hf.save_pretrained(d / "src")
    import_hf(d / "src", d / NAME)
    import_hf(d / "src", d / "tp2pp2", overrides=["parallel.tensor=2", "parallel.pipeline=2"])  # another layout
    export_hf(str(d / NAME), str(d / "hf"), verify=True)
    return d


def _free_port() -> int:
    from tests.dist_helper import free_port

    return free_port()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}


def _start(argv: list[str], port: int, log: Path, timeout: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(port, "/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise AssertionError(f"server did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(port: int, path: str) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def _post(port: int, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def _metric(port: int, name: str) -> float:
    text = _get(port, "/metrics")[1]
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def server(dirs):
    port = _free_port()
    proc = _start([sys.executable, "-m", "mtnlg", "serve", "--checkpoint", str(dirs / NAME), "--port", str(port),
                   "--max-batch-size", str(BATCH), "--max-queue", str(QUEUE)], port, dirs / "server.log")
    yield port, proc
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def native(dirs):
    from mtnlg.eval.loading import open_model

    return open_model(checkpoint=str(dirs / NAME), for_generation=True).generator


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _text(gen, ids: list[int]) -> str:
    return gen.decode([t for t in ids if t != gen.eod_id])


def test_completions_match_mtnlg_generate_and_transformers(dirs, client, native, capsys):
    from mtnlg.cli import main
    from mtnlg.eval.loading import open_model

    prompts = _prompts(4, seed=1)
    ids = [native.encode(p) for p in prompts]
    greedy = native.generate_ids(ids, 24)
    assert greedy == open_model(hf=str(dirs / "hf"), for_generation=True).generator.generate_ids(ids, 24)
    for p, want in zip(prompts, greedy):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0)
        assert r.choices[0].text == _text(native, want)
        assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(native.encode(p))
        assert r.choices[0].finish_reason == ("stop" if want[-1] == native.eod_id else "length")
    # `mtnlg generate` itself, sampled with a seed: the server's seeded choice is the same text
    assert main(["generate", "--checkpoint", str(dirs / NAME), "--prompt", prompts[0], "--max-new-tokens", "16",
                 "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=16, temperature=0.9, top_p=0.95,
                                  seed=7, extra_body={"top_k": 20})
    assert r.choices[0].text == cli["completion"]


def test_stream_chat_n_stop_seed(client, native):
    prompt = "apple banana cherry"
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                                      extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    assert whole.usage.completion_tokens == 30 and len(text) > 10
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30
    # stop: the text ends right before the stop string, whole or streamed
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "@@@"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    # n > 1 with a seed: reproducible, and the choices differ from each other
    a = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=11)
    b = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=11)
    c = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=12)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices] != [x.text for x in c.choices]
    assert len({x.text for x in a.choices}) > 1
    # chat: the messages through the tokenizer's chat template, as a completion of that text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kiwi lemon"}]
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    same = client.completions.create(model=NAME, prompt=rendered, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == same.choices[0].text and chat.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts) == same.choices[0].text
    assert [m.id for m in client.models.list().data] == [NAME]


def test_echo_logprobs_score_the_prompt(client, native):
    """echo + logprobs: the prompt tokens' logprobs are the model's (what lm-eval's loglikelihood reads)."""
    prompt = "grape hazel iris jasmine"
    ids = native.encode(prompt)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        logits = native.model(torch.tensor([ids]))[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1 : len(ids)]), want, atol=1e-4, rtol=1e-4)
    assert r.choices[0].text.startswith(prompt)
    assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]  # greedy: the chosen token is the top one


def test_64_concurrent_requests_get_the_tokens_they_get_alone(server, client):
    port = server[0]
    prompts = _prompts(64, seed=2)
    rng = random.Random(3)
    lengths = [rng.randint(4, 40) for _ in prompts]

    def ask(i: int) -> str:
        r = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == lengths[i]
        return r.choices[0].text

    alone = [ask(i) for i in range(64)]
    with cf.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, range(64)))
    assert together == alone
    assert _metric(port, "mtnlg_running_sequences_peak") >= 32  # they really shared decode steps


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    port = server[0]
    good = {"model": NAME, "prompt": "apple", "max_tokens": 2}
    cases = [
        (b"{not json", 400), (b"[1, 2]", 400), ({**good, "model": "gpt-9"}, 404), ({**good, "max_tokens": 0}, 400),
        ({**good, "prompt": "apple " * 400}, 400), ({**good, "prompt": "apple", "max_tokens": CONTEXT}, 400),
        ({**good, "temperature": -0.5}, 400), ({**good, "top_p": 1.5}, 400), ({**good, "n": 1000}, 400),
        ({**good, "prompt": [1, 2, 10**9]}, 400), ({**good, "stop": 5}, 400), ({**good, "max_tokens": "3"}, 400),
        ({"model": NAME, "messages": "hi"}, 400),
        (json.dumps({**good, "prompt": "x" * (5 << 20)}).encode(), 413),
    ]
    for body, status in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        got, answer = _post(port, path, body)
        assert got == status, (str(body)[:80], got, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert _post(port, "/v1/completions", good)[0] == 200
    r = client.completions.create(model=NAME, prompt="apple", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert _get(port, "/health") == (200, '{"status":"ok"}')


def test_client_leaving_mid_stream_frees_its_row_and_a_full_queue_answers_429(server):
    port = server[0]
    before = _metric(port, "mtnlg_generation_tokens_total")
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": "kiwi", "max_tokens": CONTEXT - 8, "stream": True, "ignore_eos": True,
         "temperature": 0}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.time() + 10
    while _metric(port, "mtnlg_running_sequences") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(port, "mtnlg_running_sequences") == 0
    spent = _metric(port, "mtnlg_generation_tokens_total") - before
    assert spent < CONTEXT - 8  # it stopped generating before its max_tokens

    # more requests than rows + queue places: the surplus is refused with 429, the rest are served
    body = {"model": NAME, "prompt": "lemon", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    go = threading.Barrier(BATCH + QUEUE + 24)

    def ask(_):
        go.wait()
        return _post(port, "/v1/completions", body)

    with cf.ThreadPoolExecutor(BATCH + QUEUE + 24) as pool:
        answers = list(pool.map(ask, range(BATCH + QUEUE + 24)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= BATCH
    assert all(a[1]["error"]["code"] == "rate_limit_exceeded" for a in answers if a[0] == 429)
    assert all(a[1]["usage"]["completion_tokens"] == 120 for a in answers if a[0] == 200)


LOCAL_TASK = {"task": "choice_serve", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": None}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
              "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
              "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


def test_lm_eval_local_completions_equals_mtnlg_lm_eval(dirs, server, tmp_path):
    import lm_eval
    import lm_eval.models  # noqa: F401  the built-in models (registering `mtnlg` first would skip their lazy import)
    import yaml
    from lm_eval.tasks import TaskManager

    from mtnlg.eval.lm_eval_model import MtnlgLM

    rng = random.Random(5)
    rows = [{"context": " ".join(rng.choice(WORDS) for _ in range(6)), "choices": rng.sample(WORDS, 3),
             "label": rng.randint(0, 2)} for _ in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = json.loads(json.dumps(LOCAL_TASK))
    spec["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "data.jsonl")
    (tmp_path / "choice_serve.yaml").write_text(yaml.safe_dump(spec))

    def run(model, model_args=None):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["choice_serve"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
        samples = out["samples"]["choice_serve"]
        return out["results"]["choice_serve"], [[r[0][0] for r in s["resps"]] for s in sorted(
            samples, key=lambda s: s["doc_id"])]

    served, served_ll = run("local-completions", f"base_url=http://127.0.0.1:{server[0]}/v1/completions,"
                            f"model={NAME},tokenizer={dirs / NAME / 'tokenizer'},tokenizer_backend=huggingface,"
                            "num_concurrent=1,max_retries=1")
    local, local_ll = run(MtnlgLM(checkpoint=str(dirs / NAME)))
    assert served["acc,none"] == local["acc,none"] and served["acc_norm,none"] == local["acc_norm,none"]
    assert len(served_ll) == 8 and all(len(x) == 3 for x in served_ll)
    torch.testing.assert_close(torch.tensor(served_ll), torch.tensor(local_ll), atol=1e-4, rtol=1e-4)


def test_hf_export_served_in_process_equals_native(dirs, native, tmp_path):
    """--hf: the export is imported as a native checkpoint and decoded by the same batched engine; its greedy tokens
    are transformers' own ``generate`` on the export (engine, no HTTP)."""
    from mtnlg.eval.loading import open_model
    from mtnlg.serve.engine import Engine, Params, Sequence
    from mtnlg.serve.metrics import Metrics
    from mtnlg.serve.model_runner import NativeRunner, open_runner

    runner, info = open_runner(None, str(dirs / "hf"), "cpu", 4, import_dir=str(tmp_path))
    assert isinstance(runner, NativeRunner) and (tmp_path / "checkpoint" / "latest").is_file()
    assert info.name == "hf" and info.chat_template is not None
    engine = Engine(runner, info, 4, 4 * CONTEXT, 4, Metrics())
    engine.start()
    try:
        prompts = [native.encode(p) for p in _prompts(3, seed=9)]
        done = threading.Semaphore(0)
        seqs = [Sequence(p, Params(max_tokens=12, temperature=0, ignore_eos=True),
                         lambda e: e["type"] == "done" and done.release()) for p in prompts]
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    want = open_model(hf=str(dirs / "hf")).generator.generate_ids(prompts, 12, stop_at_eod=False)
    assert [s.out for s in seqs] == want
    # a checkpoint of layout tensor 2 x pipeline 2 served by one process (merged on load) decodes the same
    runner, info = open_runner(str(dirs / "tp2pp2"), None, "cpu", 4)
    from mtnlg.serve.model_runner import Step

    out = runner.run(Step(prefill=[(0, prompts[0])]))
    torch.testing.assert_close(out.prefill_logits[0][-1], native.model(torch.tensor([prompts[0]]))[0, -1].float())


def test_cli_errors_are_one_line(tmp_path, capsys):
    from mtnlg.cli import main

    for argv, needle in [(["serve"], "exactly one of"), (["serve", "--checkpoint", str(tmp_path / "nope")],
                                                          "no such directory"),
                         (["serve", "--hf", str(tmp_path), "--max-batch-size", "0"], "--max-batch-size"),
                         (["serve", "--hf", str(tmp_path)], "no config.json")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def _tp_answers(port: int) -> list:
    out = []
    for i, p in enumerate(_prompts(4, seed=4)):
        body = {"model": NAME, "prompt": p, "max_tokens": 16, "ignore_eos": True, "temperature": 0 if i % 2 else 0.8,
                "seed": i, "logprobs": 2}
        status, answer = _post(port, "/v1/completions", body)
        assert status == 200, answer
        out.append((answer["choices"][0]["text"], answer["choices"][0]["logprobs"]["token_logprobs"]))
    return out


def test_tensor_parallel_server_answers_as_one_rank(dirs, server):
    port = _free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    # the checkpoint of layout tensor 2 x pipeline 2, resharded on load to tensor 2 x pipeline 1
    proc = _start([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "mtnlg",
                   "serve", "--checkpoint", str(dirs / "tp2pp2"), "--model-name", NAME, "--port", str(port),
                   "--device", "cpu"], port,
                  dirs / "tp2.log", timeout=180)
    try:
        assert "tensor parallel over 2 ranks" in (dirs / "tp2.log").read_text()
        tp2 = _tp_answers(port)
    finally:
        _stop(proc)
    log = (dirs / "tp2.log").read_text()
    # rank 0 drained and stopped rank 1 (torchrun itself reports the SIGTERM it got with a traceback of its own)
    assert "mtnlg serve: stopped" in log and "mtnlg-engine" not in log and "mtnlg/" not in log, log[-3000:]
    one = _tp_answers(server[0])
    assert [t for t, _ in tp2] == [t for t, _ in one]
    torch.testing.assert_close(torch.tensor([lp for _, lp in tp2]), torch.tensor([lp for _, lp in one]),
                               atol=1e-4, rtol=1e-4)


def test_sigterm_drains_running_requests_then_exits_0(server):
    """Last: SIGTERM while a stream runs; it finishes in full, new connections are refused, exit status 0."""
    port, proc = server
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": "olive", "max_tokens": 150, "stream": True, "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first = r.readline()
    assert first.startswith(b"data: ")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):
        _get(port, "/health")
    events = [first] + [line for line in r.read().split(b"\n") if line.startswith(b"data: ")]
    c.close()
    assert events[-1] == b"data: [DONE]"
    finals = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finals[-1] == "length" and len(finals) >= 150
    assert proc.wait(30) == 0
