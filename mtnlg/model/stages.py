"""Layer specs built into one module, as DeepSpeed's PipelineModule builds them (the pipeline-free model of every
family, and one pipeline stage of it): parameters named ``"<spec index>.<name>"``, tied ones once under
``tied_modules.<key>.``. ``SpecModel`` is what every family's model class shares."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from deepspeed.pipe import TiedLayerSpec
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.registry import is_block
from mtnlg.parallel import Init, ParallelState, TPRandom
from mtnlg.parallel.layers import sum_replicated_grads


class SpecModel(nn.Module):
    """A family's layer specs built into one module: the whole model with ``specs=None`` (pp = 1: training and
    inference), or the specs ``range(a, b)``, e.g. one pipeline stage (``mtnlg.model.layout.stage_specs``).
    A family's model class passes its ``layer_specs`` and loss, and adds its forward and decoding."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState | None, seed: int, rng: TPRandom | None,
                 specs: range | None, layer_specs: Callable, loss: Callable):
        super().__init__()
        if cfg.padded_vocab_size is None:
            raise ValueError(f"{type(self).__name__} needs a resolved ModelConfig (see mtnlg.config.resolve)")
        self.cfg = cfg
        self.ps = ps or ParallelState.single()
        if self.ps.pp_size != 1 and specs is None:
            raise ValueError("for pp > 1 train with a PipelineModule (mtnlg.training.pipeline), or build one stage "
                             "with specs=")
        self.rng = rng or TPRandom(seed, self.ps.tp_rank, self.ps.pp_rank)
        self.loss_fn = loss(cfg, self.ps)
        self.tied_modules = nn.ModuleDict()
        self._funcs: list = []
        self.owners: list[tuple[int, str, nn.Module]] = []  # (spec index, name prefix, module) holding parameters
        layers = layer_specs(cfg, self.ps, self.rng, Init(seed, cfg.init_std))
        build_specs(self, layers, range(len(layers)) if specs is None else specs)
        if self.ps.sequence_parallel:  # weights applied to sequence shards (norms): their gradients summed over tp
            sum_replicated_grads(self, self.ps.tp_group)

    def hidden_and_logits(self, inputs):
        """Run every spec this model holds (the blocks recomputed in backward under ``recompute: full``); on the last
        stage, this rank's vocabulary slice of the logits (or a task head's output)."""
        x = inputs
        checkpoint = self.cfg.recompute == "full" and self.training and torch.is_grad_enabled()
        for f in self._funcs:
            if checkpoint and is_block(f):
                x = self.rng.checkpoint(f.forward_args, *(x if isinstance(x, tuple) else (x,)))
            else:
                x = f(x)
        return x

    def spec_modules(self) -> list:
        """What each spec this model holds runs: its module, or a tied output layer's forward (a partial)."""
        return list(self._funcs)

    def spec_flops(self, seq: int) -> list[float]:
        """Forward FLOPs per token of each spec this model holds, at full (tp = 1) size, read off its parameters (a
        tied output layer: its embedding's ``head_flops``)."""
        return [f.args[0].head_flops() if isinstance(f, partial) else f.forward_flops(seq) for f in self._funcs]


def build_specs(model: nn.Module, layers: list, indices) -> None:
    """Build ``layers[i]`` for each i of ``indices`` into ``model``, filling its ``tied_modules`` (an
    nn.ModuleDict), ``_funcs`` (what each built spec runs, in order) and ``owners`` ((spec index, name prefix,
    module) of the specs holding parameters)."""
    for idx in indices:
        spec = layers[idx]
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in model.tied_modules:
                model.tied_modules[spec.key] = spec.build()
                model.owners.append((idx, f"tied_modules.{spec.key}.", model.tied_modules[spec.key]))
            module = model.tied_modules[spec.key]
            model._funcs.append(module if spec.forward_fn is None else partial(spec.forward_fn, module))
        else:
            module = spec.build()
            model.add_module(str(idx), module)
            model._funcs.append(module)
            if any(True for _ in module.parameters()):
                model.owners.append((idx, f"{idx}.", module))
