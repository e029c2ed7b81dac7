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


def bench_batches(cfg: RunConfig, dp_rank: int, dp_size: int, device: torch.device) -> list:
    """This dp rank's micro batches of one fixed global batch, on ``device``: uniform random token windows for a GPT
    (``synthetic_batches``), or a family's own synthetic samples (``data.synthetic``: BERT's masked sentence pairs,
    T5's copy task) through its ``collate``, as training reads them. mtnlg and the peer get the same ones."""
    from types import SimpleNamespace

    from mtnlg.model.registry import family
    from mtnlg.training.loop import micro_batches
    from mtnlg.training.sources import build_sources

    if family(cfg.model).sources is None:
        return [(ids.to(device), lab.to(device)) for ids, lab in synthetic_batches(cfg, seed=1234 + dp_rank)]
    train, _ = build_sources(cfg)
    return micro_batches(train, 0, cfg, SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size), device)


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
        self.batches = bench_batches(self.cfg, self.ps.dp_rank, self.ps.dp_size, device)
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


def hf_class(cfg: RunConfig):
    """The transformers class mtnlg exports the model to (``mtnlg.convert.hf``'s adapter: MegatronBertForPreTraining,
    T5ForConditionalGeneration; a causal LM: AutoModelForCausalLM's class for the config)."""
    import transformers

    from mtnlg.convert.hf import adapter_for

    adapter = adapter_for(cfg.model)
    if not hasattr(adapter, "training_kwargs"):
        return transformers.AutoModelForCausalLM
    return getattr(transformers, adapter.class_name(cfg.model) if hasattr(adapter, "class_name") else adapter.HF_CLASS)


def peer_attns(cfg: RunConfig) -> tuple[str, ...]:
    """The attention implementations of ``PEER_ATTNS`` the peer's class has (T5's has eager only: its relative
    position bias)."""
    cls = hf_class(cfg)
    if cls.__name__.startswith("Auto"):
        return PEER_ATTNS
    return tuple(a for a in PEER_ATTNS if a == "eager" or getattr(cls, "_supports_sdpa", False))


def training_kwargs(cfg: RunConfig):
    """(inputs, labels) of a micro batch -> the HF class's keyword arguments for a training step (the adapter's
    ``training_kwargs``; a causal LM: the ids and the already shifted labels, as ``shift_labels``, so that HF's loss
    makes the same T predictions as mtnlg's)."""
    from mtnlg.convert.hf import adapter_for

    adapter = adapter_for(cfg.model)
    if hasattr(adapter, "training_kwargs"):
        return adapter.training_kwargs
    return lambda ids, labels: {"input_ids": ids, "labels": labels, "shift_labels": labels}


# HF names of the tanh GELU computed in Python ops; ``gelu_pytorch_tanh`` is the same function, fused
_TANH_GELUS = ("gelu_new", "gelu_fast")


def hf_model(cfg: RunConfig, attn: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised HF model with mtnlg's model dims, of the class mtnlg exports the architecture to
    (``hf_class``), attention implementation ``attn`` (one of ``peer_attns(cfg)``); a tanh GELU (GPT-2's, Megatron
    BERT's, T5 v1.1's gated one) is HF's fused ``gelu_pytorch_tanh`` (the same function)."""
    from mtnlg.convert.hf_export import hf_config

    if attn not in peer_attns(cfg):
        raise ValueError(f"attention implementation {attn!r}: use one of {', '.join(peer_attns(cfg))}")
    hf_cfg = hf_config(cfg.model, "fp32", {})
    hf_cfg.use_cache = False
    for key in ("activation_function", "hidden_act", "dense_act_fn"):
        if getattr(hf_cfg, key, None) in _TANH_GELUS or (key == "activation_function" and hasattr(hf_cfg, key)):
            setattr(hf_cfg, key, "gelu_pytorch_tanh")
    hf_cfg._attn_implementation = attn
    cls = hf_class(cfg)
    return cls.from_config(hf_cfg) if cls.__name__.startswith("Auto") else cls._from_config(hf_cfg)


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
        self.batches = bench_batches(cfg, self.dp_rank, dist.get_world_size(), device)
        self.kwargs = training_kwargs(cfg)

    def step(self) -> float:
        self.engine.train()
        total = None
        for inputs, labels in self.batches:
            loss = self.engine(**self.kwargs(inputs, labels)).loss
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
