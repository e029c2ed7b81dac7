"""Continuous batching: sequences wait in a bounded queue, take a cache row when one is free and the KV budget
(``max_batch_tokens``: prompt + answer tokens reserved by the running sequences) allows, are prefilled in the
next step (at most ``prefill_tokens`` prompt tokens a step, so decoding never stalls long), then decode one token
a step with every other running sequence, and give their row back the step they finish or their client leaves.

The engine runs in its own thread and reports to each sequence's ``emit`` callback (called from that thread, or
in the sequence's asyncio loop: one hand-over per step). Greedy rows take one batched argmax; sampled rows draw
from their own generators; each answer's text is decoded incrementally (``Engine._text``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mtnlg.eval.generate import sample
from mtnlg.serve.metrics import Metrics
from mtnlg.serve.model_runner import ModelInfo, Step

DETOKENIZE_WINDOW = 8  # tokens decoded again each step (their text may still change with the next token)
IDLE_HEARTBEAT_S = 5.0  # with tensor-parallel followers: an empty step this often, so their collectives never time out


class QueueFull(Exception):
    pass


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token (0 = only the chosen token's logprob)
    echo: bool = False
    ignore_eos: bool = False


@dataclass(eq=False)
class Sequence:
    """One choice of one request. ``emit`` gets its events: called in the engine thread, or, when ``loop`` (an
    asyncio loop) is given, in that loop, with one hand-over per loop per step for all its sequences' events."""
    prompt: list[int]
    params: Params
    emit: Callable[[dict], None]
    loop: Any = None
    row: int = -1
    out: list[int] = field(default_factory=list)
    text_sent: int = 0  # characters of the answer already reported
    text_done: str = ""  # the text of out[:done_upto], which no later token changes
    done_upto: int = 0
    finished: str | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0
    generator: torch.Generator | None = None

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.params.max_tokens


class Engine:
    def __init__(self, runner, info: ModelInfo, max_batch_size: int, max_batch_tokens: int, max_queue: int,
                 metrics: Metrics, prefill_tokens: int = 512):
        self.runner, self.info, self.metrics = runner, info, metrics
        self.max_batch_size, self.max_batch_tokens, self.max_queue = max_batch_size, max_batch_tokens, max_queue
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # row -> sequence
        self.free_rows = list(range(max_batch_size))[::-1]
        self.lock = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="mtnlg-engine", daemon=True)
        self.error: BaseException | None = None

    # -- called from the web server ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request together, or raise QueueFull (the caller answers 429)."""
        with self.lock:
            if len(self.waiting) + len(self.running) + len(seqs) > self.max_batch_size + self.max_queue:
                raise QueueFull()
            for i, s in enumerate(seqs):
                seed = s.params.seed if s.params.seed is not None else int(torch.randint(0, 2**62, ()).item())
                s.generator = torch.Generator().manual_seed(seed + i)  # choice i of a seeded request: seed + i
                self.waiting.append(s)
            self.metrics.queue_depth.set(len(self.waiting))
            self.lock.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """The client went away: drop its sequences (their rows are freed before the next step)."""
        with self.lock:
            for s in seqs:
                s.cancelled = True
            self.lock.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    self._drop_cancelled()
                    while not self.stopping and not self.waiting and not self.running:
                        if not self.lock.wait(IDLE_HEARTBEAT_S) and self.info.world > 1:
                            break  # an empty step keeps the followers' collectives alive
                    if self.stopping:
                        break
                    admitted = self._admit()
                self._step(admitted)
        except BaseException as e:  # an internal error: fail every request rather than hang them
            self.error = e
            with self.lock:
                self._deliver([(s, {"type": "error", "message": f"internal error: {e}"})
                               for s in [*self.waiting, *self.running.values()]])
            raise
        finally:
            self.runner.run(Step(stop=True))

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for s in list(self.running.values()):
            if s.cancelled:
                self._free(s)
        self.metrics.queue_depth.set(len(self.waiting))

    def _admit(self) -> list[Sequence]:
        """Sequences that take a row now: in arrival order, while rows, the KV budget and the step's prefill
        allowance last."""
        admitted: list[Sequence] = []
        budget = self.max_batch_tokens - sum(s.reserved for s in self.running.values())
        prefill = 0
        while self.waiting and self.free_rows:
            s = self.waiting[0]
            if s.reserved > budget or (admitted and prefill + len(s.prompt) > self.prefill_tokens):
                break
            self.waiting.popleft()
            s.row = self.free_rows.pop()
            self.running[s.row] = s
            budget -= s.reserved
            prefill += len(s.prompt)
            admitted.append(s)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))
        self.metrics.running_peak.set(max(self.metrics.running_peak.v, len(self.running)))
        return admitted

    def _step(self, admitted: list[Sequence]) -> None:
        new_rows = {s.row for s in admitted}
        decoding = [s for s in self.running.values() if s.row not in new_rows and s.out]
        step = Step(prefill=[(s.row, s.prompt) for s in admitted], decode=[(s.row, s.out[-1]) for s in decoding])
        out = self.runner.run(step)
        now = time.monotonic()
        events: list[tuple[Sequence, dict]] = []
        for s, logits in zip(admitted, out.prefill_logits):
            if s.params.echo and s.params.logprobs is not None:
                events.append((s, {"type": "prompt",
                                   "logprobs": _prompt_logprobs(logits, s.prompt, s.params.logprobs)}))
            self._take(s, logits[-1:], int(logits[-1].argmax()), now, events)
            self.metrics.ttft.observe(now - s.arrived)
            self.metrics.prompt_tokens.inc(len(s.prompt))
        if decoding:
            greedy = out.decode_logits.argmax(-1).tolist()  # one batched argmax; sampled rows draw on their own
            for i, s in enumerate(decoding):
                self.metrics.itl.observe(now - s.last_token_at)
                self._take(s, out.decode_logits[i : i + 1], greedy[i], now, events)
        self._deliver(events)
        with self.lock:
            for s in [*admitted, *decoding]:
                if s.finished is not None or s.cancelled:
                    self._free(s)
            self.metrics.running.set(len(self.running))

    @staticmethod
    def _deliver(events: list[tuple[Sequence, dict]]) -> None:
        """Hand a step's events over: one call into each asyncio loop, direct calls for sequences without one."""
        by_loop: dict[Any, list] = {}
        for s, event in events:
            if s.loop is None:
                s.emit(event)
            else:
                by_loop.setdefault(s.loop, []).append((s.emit, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_emit_all, batch)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

    def _take(self, s: Sequence, logits: torch.Tensor, greedy: int, now: float, events: list) -> None:
        """Take the next token of ``s`` (``greedy``, the argmax of its logits (1, V), or a sample), report it, and
        decide whether ``s`` is done."""
        if s.cancelled:
            return
        p = s.params
        token = greedy if p.temperature <= 0 else int(sample(logits, p.temperature, p.top_k, p.top_p,
                                                             s.generator)[0])
        s.out.append(token)
        s.last_token_at = now
        self.metrics.generation_tokens.inc()
        info = None
        if p.logprobs is not None:
            info = _token_logprobs(logits[0], token, p.logprobs)
        eos = token == self.info.eod_id and not p.ignore_eos
        text = self._text(s, len(s.out) - 1 if eos else len(s.out))
        finished = "stop" if eos else None
        for stop in p.stop:
            at = text.find(stop, max(0, s.text_sent - len(stop)))
            if at >= 0:
                text, finished = text[:at], "stop"
        if finished is None and len(s.out) >= p.max_tokens:
            finished = "length"
        if finished is None:  # hold back what may still become a stop string or an unfinished character
            hold = max((len(x) - 1 for x in p.stop), default=0)
            safe = len(text) - hold
            while safe > s.text_sent and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(text)
        delta = text[s.text_sent : max(safe, s.text_sent)]
        s.text_sent = max(safe, s.text_sent)
        events.append((s, {"type": "token", "text": delta, "token": token, "logprobs": info}))
        if finished is not None:
            s.finished = finished
            events.append((s, {"type": "done", "finish_reason": finished, "completion_tokens": len(s.out)}))

    def _text(self, s: Sequence, upto: int) -> str:
        """The text of ``s.out[:upto]``, decoding only the tokens after the last settled point (the text of the tokens
        before it is kept): every DETOKENIZE_WINDOW tokens, the point moves up to DETOKENIZE_WINDOW tokens before
        the end where the text there splits cleanly (decoded apart = decoded together, no unfinished character)."""
        dec = self.info.decode
        tail = dec(s.out[s.done_upto : upto])
        text = s.text_done + tail
        cut = upto - DETOKENIZE_WINDOW
        if cut - s.done_upto >= DETOKENIZE_WINDOW and not tail.endswith("\ufffd"):
            keep = dec(s.out[s.done_upto : cut])
            if not keep.endswith("\ufffd") and keep + dec(s.out[cut:upto]) == tail:
                s.text_done, s.done_upto = s.text_done + keep, cut
        return text

    def _free(self, s: Sequence) -> None:
        if self.running.get(s.row) is s:
            del self.running[s.row]
            self.free_rows.append(s.row)


def _emit_all(batch: list) -> None:
    for emit, event in batch:
        emit(event)


def _token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    lp = torch.log_softmax(logits.float(), -1)
    alts = {}
    if top > 0:
        vals, ids = lp.topk(min(top, lp.numel()))
        alts = {int(i): float(v) for v, i in zip(vals, ids)}
    return {"logprob": float(lp[token]), "top": alts}


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[dict | None]:
    """Per prompt token: its logprob given the tokens before it (None for the first), and the top alternatives."""
    lp = torch.log_softmax(logits.float(), -1)  # (T, V): row t predicts token t + 1
    out: list[dict | None] = [None]
    for t in range(1, len(prompt)):
        alts = {}
        if top > 0:
            vals, ids = lp[t - 1].topk(min(top, lp.size(-1)))
            alts = {int(i): float(v) for v, i in zip(vals, ids)}
        value = float(lp[t - 1, prompt[t]])
        out.append({"logprob": value if math.isfinite(value) else -1e30, "top": alts})
    return out
