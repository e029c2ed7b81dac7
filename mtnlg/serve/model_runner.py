"""The server's one touch point with a model: open it (``mtnlg.eval.loading.open_model``), prefill a prompt into a
cache row, decode one token for many rows, and free a row. Everything else in ``mtnlg.serve`` sees token ids and
logits only.

``NativeRunner`` keeps one key/value cache of ``max_batch_size`` rows (the model's ``new_cache``); each step runs on
a window of it (the rows up to the highest busy one, the positions up to the longest row, rounded up), built from
views of the cache's public ``KVSlot`` fields, so a step costs what its sequences need, not the whole cache.
Under a launcher every tensor-parallel rank holds its heads of the same cache: rank 0 decides each step
(``Step``), sends it to the others on a gloo group, and all run it together (``follow`` on ranks > 0).

A Hugging Face directory (``--hf``) is imported as a native checkpoint first and served by the same runner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from mtnlg.errors import UserError

WINDOW_ROUND = 64  # positions of a step's window are rounded up to this (fewer distinct shapes)


@dataclass
class Step:
    """One engine step, the same on every rank: rows to prefill with their prompts, then one decode token per row."""
    prefill: list[tuple[int, list[int]]] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)  # (row, token)
    stop: bool = False


@dataclass
class StepOut:
    prefill_logits: list[torch.Tensor]  # per prefilled row: (T, V) float on CPU (all prompt positions)
    decode_logits: torch.Tensor | None  # (len(decode), V) float on CPU


@dataclass
class ModelInfo:
    name: str
    encode: Any
    decode: Any
    eod_id: int
    context: int  # positions a prompt plus its answer may use
    vocab_size: int
    chat_template: Any  # a callable(messages) -> str, or None when the tokenizer has none
    rank: int
    world: int


def open_runner(checkpoint: str | None, hf: str | None, device: str, max_batch_size: int,
                name: str | None = None, import_dir: str | None = None) -> tuple[Any, ModelInfo]:
    """(runner, info) for a native checkpoint (any layout; tensor-parallel under a launcher) or an HF directory,
    which is imported first (``import-hf`` into ``import_dir``, default a temporary directory removed at exit)
    and then served as a native checkpoint: the same batched engine either way."""
    from mtnlg.eval.loading import open_model

    if checkpoint is not None and hf is not None:
        raise UserError("give exactly one of --checkpoint DIR or --hf DIR")
    path = checkpoint or hf
    if path is None or not os.path.isdir(path):
        raise UserError(f"{path or 'a model'}: no such directory; give --checkpoint DIR (an mtnlg checkpoint) "
                        "or --hf DIR (a Hugging Face model)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if hf is not None:
        if world > 1:
            raise UserError("--hf serves in one process; for tensor parallelism convert it first "
                            "(mtnlg import-hf DIR OUT) and launch the ranks with --checkpoint OUT")
        checkpoint = _import(hf, import_dir)
    opened = open_model(checkpoint=checkpoint, device=device, for_generation=True)
    gen = opened.generator
    if gen is None:
        raise UserError("serving needs pipeline = 1: launch as many ranks as the tensor size, or one process")
    served = name or os.path.basename(os.path.normpath(path))
    cfg = gen.model.cfg
    context = min(gen.max_positions, cfg.seq_length)
    runner = NativeRunner(gen.model, max_batch_size, context, opened.rank, world)
    info = ModelInfo(served, gen.encode, gen.decode, opened.eod_id, int(context), int(cfg.vocab_size),
                     _native_chat_template(checkpoint), opened.rank, world)
    return runner, info


def _import(hf: str, import_dir: str | None) -> str:
    """``hf`` as an mtnlg checkpoint (weights and tokenizer copied; import-hf refuses unsupported models in one
    line)."""
    import atexit
    import shutil
    import tempfile

    from mtnlg.eval.loading import hf_as_checkpoint

    if import_dir is None:
        import_dir = tempfile.mkdtemp(prefix="mtnlg-serve-hf-")
        atexit.register(shutil.rmtree, import_dir, ignore_errors=True)
    return hf_as_checkpoint(hf, os.path.join(import_dir, "checkpoint"))


def _chat_template(hf_tok) -> Any:
    if not getattr(hf_tok, "chat_template", None):
        return None
    return lambda messages: hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _native_chat_template(checkpoint: str) -> Any:
    """The checkpoint's tokenizer/ directory read by transformers (it is an HF tokenizer directory)."""
    tok_dir = os.path.join(checkpoint, "tokenizer")
    if not os.path.isdir(tok_dir):
        return None
    from transformers import AutoTokenizer

    return _chat_template(AutoTokenizer.from_pretrained(tok_dir, local_files_only=True))


class NativeRunner:
    """Continuous batching over an mtnlg model's KV cache: rows are slots that sequences take and give back."""

    def __init__(self, model, rows: int, context: int, rank: int = 0, world: int = 1):
        self.model, self.rows, self.context, self.rank, self.world = model, rows, context, rank, world
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(rows, context)
        self.group = None
        if world > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # steps travel as Python objects on the CPU

    # -- the step every rank runs -------------------------------------------------------------------------------
    def run(self, step: Step) -> StepOut | None:
        """Run ``step`` (rank 0 first sends it to the other ranks); rank 0 gets the logits."""
        if self.group is not None:
            self._broadcast(step)
        if step.stop:
            return None
        return self._execute(step)

    def follow(self) -> None:
        """Ranks > 0: run the steps rank 0 sends until it sends ``stop``."""
        while True:
            step = self._broadcast(None)
            if step.stop:
                return
            self._execute(step)

    def _broadcast(self, step: Step | None) -> Step:
        import torch.distributed as dist

        box = [step]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @torch.inference_mode()  # (and gloo's small all-reduces as all-gathers: mtnlg.parallel.mappings)
    def _execute(self, step: Step) -> StepOut:
        prefill_logits = []
        for row, ids in step.prefill:
            for slot in self.cache:
                slot.start[row] = 0  # the row's previous sequence is gone: start over at position 0
            window = self._window(row, row + 1, len(ids))
            logits = self.model.forward_cached(torch.tensor([ids], device=self.device), window)
            prefill_logits.append(logits[0].float().cpu())
        decode_logits = None
        if step.decode:
            rows = [r for r, _ in step.decode]
            hi = max(rows) + 1
            tokens = torch.zeros(hi, 1, dtype=torch.long)
            busy = torch.zeros(hi, dtype=torch.bool)
            for r, t in step.decode:
                tokens[r, 0], busy[r] = t, True
            dev = self.cache[0].start.device
            busy, free = busy.to(dev), torch.ones(hi, dtype=torch.bool, device=dev)
            free[busy] = False
            for row, _ in step.prefill:  # prefilled this step, decoding from the next: live, but not in this decode
                if row < hi:
                    free[row] = False
            saved = [slot.start[:hi].clone() for slot in self.cache]
            for slot in self.cache:  # free rows decode a dummy token at position 0; live rows not decoding write
                slot.start[:hi].masked_fill_(free, 0)  # a dummy at their next position, overwritten later
            logits = self.model.forward_cached(tokens.to(self.device), self._window(0, hi, 1))[:, -1]
            for slot, before in zip(self.cache, saved):
                slot.start[:hi] = torch.where(busy, slot.start[:hi], before)
            decode_logits = logits[rows].float().cpu()
        return StepOut(prefill_logits, decode_logits)

    def _window(self, lo: int, hi: int, new: int) -> list:
        """Views of rows [lo, hi) and the first L positions of every layer's cache (L covers each row's next tokens)."""
        need = int(self.cache[0].start[lo:hi].max()) + new
        if need > self.context:
            raise RuntimeError(f"a row needs {need} positions, the cache has {self.context}")
        length = min(self.context, -(-need // WINDOW_ROUND) * WINDOW_ROUND)
        return [_slot_view(slot, lo, hi, length) for slot in self.cache]


def _slot_view(slot, lo: int, hi: int, length: int):
    """A KVSlot of the same class sharing ``slot``'s storage: rows [lo, hi), positions [0, length)."""
    view = object.__new__(type(slot))
    view.__dict__.update(slot.__dict__)
    view.k, view.v = slot.k[lo:hi, :, :length], slot.v[lo:hi, :, :length]
    view.start = slot.start[lo:hi]
    view.seg, view.pos = slot.seg[lo:hi, :length], slot.pos[lo:hi, :length]
    view.rows, view.new_seg, view.new_pos = slice(None), None, None
    return view
