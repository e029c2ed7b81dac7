"""DeepSpeed universal-checkpoint metadata: how every parameter's tp shards merge and re-split.

DeepSpeed's ``ds_to_universal`` merges the shards of each parameter by the first rule whose
regex ``re.match``es its name; a sliced parameter matched by none is concatenated on dim 0,
which silently garbles anything else. So every parameter gets a rule, read off its sharding
(``param.sharding``, see ``mtnlg.model.layout``), never from a list kept here:

- replicated across tp (norms, row-parallel biases, learned positions): take one copy;
- row-parallel weights: concatenate on dim 1;
- vocabulary-parallel (word embeddings, untied LM head): concatenate, strip the padding;
- column-parallel with fused blocks ([q; k; v], unequal under GQA; [gate; up]): each block merged on its own;
- plain column-parallel: concatenate on dim 0 (DeepSpeed's default);
- the tied embedding's copy on the last pipeline stage: skipped (pipeline-replicated).

Names are those of DeepSpeed's PipelineModule (``<layer index>.<name>``,
``tied_modules.embed.<name>``), which the family's pipeline-free model uses too, so one rule set serves every layout:
a layer index becomes ``\\d+`` in the patterns.
"""

from __future__ import annotations

import re

from mtnlg.config import ModelConfig
from mtnlg.model.layout import groups
from mtnlg.model.registry import family


def _pattern(prefix: str, local: str) -> str:
    head = r"\d+\." if re.fullmatch(r"\d+\.", prefix) else re.escape(prefix)
    return head + re.escape(local) + "$"


def universal_checkpoint_info(cfg: ModelConfig, tp: int) -> dict:
    """The ``universal_checkpoint_info`` of a model with config ``cfg`` trained at tensor size ``tp``."""
    kinds: dict[str, str] = {}
    sub_params, widths = [], {}
    for group in groups(cfg):
        for local, sharding in group.params:
            pattern = _pattern(group.prefix, local)
            kind = "blocks" if sharding.blocks else sharding.kind
            if kinds.setdefault(pattern, kind) != kind:
                raise ValueError(f"{pattern}: parameters of two shardings ({kinds[pattern]}, {kind}) share a name")
            if kind == "blocks" and pattern not in widths:
                rest = (-1,) * (len(sharding.full_shape) - 1)
                sub_params.append({"patterns": [pattern], "shape": (sharding.blocks, *rest),
                                   "partition_dim": sharding.dim})
                widths[pattern] = [[b // tp] * tp for b in sharding.blocks]
    of = {kind: [p for p, k in kinds.items() if k == kind] for kind in ("replicated", "row", "vocab")}
    info = {
        "universal_checkpoint_version": 0.4,
        "tp_replicated_parameter_patterns": of["replicated"],
        "parameter_with_row_parallelism_patterns": of["row"],
        "vocabulary_parameter_patterns": of["vocab"],
        "original_vocab_size": cfg.vocab_size,
        "parameter_with_sub_params": sub_params,
        "sub_param_shard_widths": widths,
    }
    tied = family(cfg).tied_weight_names(cfg)
    if tied:
        info["pipeline_replicated_parameter_patterns"] = [re.escape(name) + "$" for name in tied]
    return info
