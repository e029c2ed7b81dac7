"""Layer specs built into one module, as DeepSpeed's PipelineModule builds them (the pipeline-free model of every
family, and one pipeline stage of it): parameters named ``"<spec index>.<name>"``, tied ones once under
``tied_modules.<key>.``."""

from __future__ import annotations

from functools import partial

from deepspeed.pipe import TiedLayerSpec
from torch import nn


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
