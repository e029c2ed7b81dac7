"""What a benchmark worker times: mtnlg's training Engine, or the Hugging Face + DeepSpeed peer.

Both train the same model dims on the same synthetic batches (uniform random token ids, one
fixed global batch) through ``deepspeed.initialize`` with the same DeepSpeed config, batch
sizes, precision and AdamW settings. ``step()`` runs one optimizer step and returns its loss
as a Python float (one host sync per step, on both sides).

The peer's attention implementation is a parameter (``"eager"`` or ``"sdpa"``): which is faster
depends on the machine (on CPU, bf16, the unfused form often wins), so ``mtnlg bench`` times both
and compares mtnlg against the faster. Otherwise the peer uses HF's stock fast settings: the fused
``gelu_pytorch_tanh`` (the same tanh-GELU as mtnlg's gpt2 architecture), weights built locally from a
config (no hub). Its vocabulary is not padded (HF's default); its loss is HF's own
(``ForCausalLMLoss``: fp32 logits, ``F.cross_entropy``), given the same next-token labels. It runs
at any data-parallel size (tp = pp = 1); each dp rank trains on its own micro batches, as mtnlg's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from mtnlg.config import RunConfig, from_dict, resolve
from mtnlg.model.flops import flops_per_token, param_count
from mtnlg.training.metrics import current_rss_mb


def synthetic_batches(cfg: RunConfig, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``grad_accum_steps`` micro batches of (input_ids, labels), each (micro_batch, seq_length)."""
    t, m = cfg.train, cfg.model
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(t.grad_accum_steps):
        tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def optimizer_flags(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The implementation switches of a torch AdamW (what the peer must match)."""
    d = optimizer.defaults
    return {"class": type(optimizer).__name__, "fused": d.get("fused"), "foreach": d.get("foreach")}


class MtnlgSetup:
    """mtnlg's ``Engine`` on this rank's layout (tp x pp x dp from the config and the world size)."""

    kind = "mtnlg"

    def __init__(self, cfg_dict: dict, device: torch.device):
        import torch.distributed as dist

        from mtnlg.parallel import ParallelState
        from mtnlg.training.engine import Engine

        world = dist.get_world_size()
        rss_before = current_rss_mb()
        self.cfg = resolve(from_dict(cfg_dict), world)
        p = self.cfg.parallel
        self.ps = ParallelState.create(p.tensor, p.pipeline, p.sequence_parallel)
        t0 = time.perf_counter()
        self.engine = Engine(self.cfg, self.ps, device)
        self.build_s = time.perf_counter() - t0
        self.rss_before_build_mb = rss_before
        self.device = device
        # each dp rank trains on its own micro batches (the same ones at every step)
        self.batches = [(ids.to(device), lab.to(device))
                        for ids, lab in synthetic_batches(self.cfg, seed=1234 + self.ps.dp_rank)]
        self.iteration = 0

    def step(self) -> float:
        self.iteration += 1
        self.engine.rng.seed_iteration(self.iteration)
        return self.engine.train_step(self.batches).loss

    def saved_activation_bytes(self) -> tuple[int, int]:
        """Bytes autograd keeps for backward over one micro batch's forward on this rank (parameters excluded, each
        storage once): the activation memory ``mtnlg.training.memory`` predicts; all of them, and those kept
        inside the transformer blocks (the per-layer memory sequence parallelism and recompute act on). pp = 1."""
        from mtnlg.model.registry import is_block

        if self.ps.pp_size > 1:
            raise ValueError("saved activations are measured at pp = 1")
        module = self.engine.module
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen: dict[int, int] = {}
        in_blocks: dict[int, int] = {}
        depth = [0]
        blocks = [m for m in module.modules() if is_block(m)]
        handles = [h for b in blocks for h in (
            b.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)),
            b.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)))]
        rng, plain = module.rng, module.rng.checkpoint

        def checkpoint(fn, *args):  # full recompute keeps a block's input as the checkpoint's, outside the block
            block = is_block(fn)
            depth[0] += block
            try:
                return plain(fn, *args)
            finally:
                depth[0] -= block

        rng.checkpoint = checkpoint

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
                if depth[0]:
                    in_blocks[storage.data_ptr()] = storage.nbytes()
            return t

        module.train()
        ids, labels = self.batches[0]
        self.engine.rng.seed_iteration(self.iteration + 1)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                module(ids, labels)  # forward only; the graph is dropped
        finally:
            del rng.checkpoint  # the method again
            for h in handles:
                h.remove()
        return sum(seen.values()), sum(in_blocks.values())

    def info(self) -> dict[str, Any]:
        opt = getattr(self.engine, "guard", None) or self.engine.engine.basic_optimizer
        return {"kind": self.kind, "params": param_count(self.cfg.model),
                "flops_per_token": flops_per_token(self.cfg.model), "optimizer": optimizer_flags(opt),
                "ds_optimizer": type(self.engine.engine.optimizer).__name__, "build_s": self.build_s,
                "zero_stage": self.engine.engine.zero_optimization_stage(),
                "tokens_per_step": self.cfg.train.global_batch_size * self.cfg.model.seq_length,
                "layout": dataclasses.asdict(self.cfg.parallel), "threads": torch.get_num_threads(),
                "rss_before_build_mb": self.rss_before_build_mb}


PEER_ATTNS = ("eager", "sdpa")  # the HF attention implementations the bench times


def hf_model(cfg: RunConfig, attn: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised HF model with mtnlg's model dims, of the class mtnlg exports the architecture to
    (``mtnlg.convert.hf_export.hf_config``: GPT2LMHeadModel, LlamaForCausalLM, ...), attention implementation
    ``attn`` (one of ``PEER_ATTNS``); GPT-2's tanh GELU is HF's fused ``gelu_pytorch_tanh`` (the same function)."""
    from transformers import AutoModelForCausalLM

    from mtnlg.convert.hf_export import hf_config

    if attn not in PEER_ATTNS:
        raise ValueError(f"attention implementation {attn!r}: use one of {', '.join(PEER_ATTNS)}")
    hf_cfg = hf_config(cfg.model, "fp32", {})
    hf_cfg.use_cache = False
    if hasattr(hf_cfg, "activation_function"):
        hf_cfg.activation_function = "gelu_pytorch_tanh"
    hf_cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(hf_cfg)


class PeerSetup:
    """The same model dims as a Hugging Face model (attention ``attn``), trained by ``deepspeed.initialize``
    on every rank of the world as pure data parallelism (tp = pp = 1)."""

    kind = "peer"

    def __init__(self, cfg_dict: dict, device: torch.device, optimizer: dict[str, Any] | None = None,
                 attn: str = "sdpa"):
        import deepspeed
        import torch.distributed as dist

        from mtnlg.training.ds_config import adam_hyperparams, build_ds_config
        from mtnlg.training.schedule import LRSchedule, param_groups

        self.cfg = cfg = resolve(from_dict(cfg_dict), dist.get_world_size())
        if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
            raise ValueError("the HF peer has no tensor or pipeline parallelism; bench it at tp = pp = 1")
        self.dp_rank = dist.get_rank()  # tp = pp = 1: the rank is the data-parallel rank
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        t0 = time.perf_counter()
        model = hf_model(cfg, attn)
        ds_config = build_ds_config(cfg)
        ds = dict(ds_config)
        ds.pop("optimizer", None)
        flags = {k: v for k, v in (optimizer or {}).items() if k in ("fused", "foreach") and v is not None}
        opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                **adam_hyperparams(ds_config), **flags)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=LRSchedule(opt, cfg.train),
                                                    config=ds)
        self.build_s = time.perf_counter() - t0
        self.opt = opt
        # each dp rank trains on its own micro batches, the same ones as mtnlg's rank with that dp rank
        self.batches = [(ids.to(device), lab.to(device))
                        for ids, lab in synthetic_batches(cfg, seed=1234 + self.dp_rank)]

    def step(self) -> float:
        self.engine.train()
        total = None
        for ids, labels in self.batches:
            # labels already shifted: HF's loss uses ``shift_labels`` as given (the same T predictions as mtnlg)
            loss = self.engine(input_ids=ids, labels=labels, shift_labels=labels).loss
            self.engine.backward(loss)
            self.engine.step()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        return float(total) / len(self.batches)

    def info(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.engine.module.parameters())
        return {"kind": self.kind, "params": n, "flops_per_token": flops_per_token(self.cfg.model),
                "optimizer": optimizer_flags(self.opt), "ds_optimizer": type(self.engine.optimizer).__name__,
                "build_s": self.build_s, "model_class": type(self.engine.module).__name__,
                "zero_stage": self.engine.zero_optimization_stage(),
                "attn_implementation": self.engine.module.config._attn_implementation,
                "tokens_per_step": self.cfg.train.global_batch_size * self.cfg.model.seq_length,
                "layout": dataclasses.asdict(self.cfg.parallel), "threads": torch.get_num_threads()}


def build(kind: str, cfg_dict: dict, device: torch.device, optimizer: dict | None = None,
          attn: str | None = None) -> MtnlgSetup | PeerSetup:
    """The setup ``kind`` ("mtnlg" or "peer"; ``optimizer`` and ``attn`` apply to the peer)."""
    if kind == "mtnlg":
        return MtnlgSetup(cfg_dict, device)
    if kind == "peer":
        return PeerSetup(cfg_dict, device, optimizer, attn or "sdpa")
    raise ValueError(f"unknown setup kind {kind!r}")
