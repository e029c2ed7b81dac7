"""DeepSpeed universal-checkpoint metadata: how every parameter's tp shards merge and re-split.

DeepSpeed's ``ds_to_universal`` merges the shards of each parameter by the first rule whose
regex ``re.match``es its name; a sliced parameter matched by none is concatenated on dim 0,
which silently garbles anything else. So every kind of parameter gets a rule here:

- replicated across tp (norms, row-parallel biases, learned positions): take one copy;
- row-parallel weights (attention and MLP output projections): concatenate on dim 1;
- vocabulary-parallel (word embeddings, untied LM head): concatenate, strip the padding;
- fused column-parallel [q; k; v] (unequal blocks under GQA): each block merged on its own;
- fused [gate; up] (SwiGLU): two equal blocks;
- plain column-parallel (gpt2 MLP input): concatenate on dim 0 (DeepSpeed's default);
- the tied embedding's copy on the last pipeline stage: skipped (pipeline-replicated).

Names are those of DeepSpeed's PipelineModule (``<layer index>.<name>``,
``tied_modules.embed.<name>``), which GPTModel uses too, so one rule set serves every layout.
"""

from __future__ import annotations

from mtnlg.config import ModelConfig

L = r"\d+"  # a layer index
EMBED = rf"(tied_modules\.embed|{L})"


def universal_checkpoint_info(cfg: ModelConfig, tp: int) -> dict:
    """The ``universal_checkpoint_info`` of a model with config ``cfg`` trained at tensor size ``tp``."""
    norms = [rf"{L}\.norm\d?\.weight$"] + ([rf"{L}\.norm\d?\.bias$"] if cfg.bias else [])
    replicated = list(norms)
    if cfg.bias:
        replicated += [rf"{L}\.attn\.proj\.bias$", rf"{L}\.mlp\.proj\.bias$"]
    if cfg.position_embedding == "learned":
        replicated.append(rf"{EMBED}\.position_embeddings\.weight$")
    vocab = [rf"{EMBED}\.word_embeddings\.weight$"]
    if not cfg.tie_embeddings:
        vocab.append(rf"{L}\.head\.weight$")

    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    widths = [[q // tp] * tp, [kv // tp] * tp, [kv // tp] * tp]
    qkv = [{"patterns": [rf"{L}\.attn\.qkv\.weight$"], "shape": ((q, kv, kv), -1), "partition_dim": 0}]
    shard_widths = {rf"{L}\.attn\.qkv\.weight$": widths}
    if cfg.bias:
        qkv.append({"patterns": [rf"{L}\.attn\.qkv\.bias$"], "shape": ((q, kv, kv),), "partition_dim": 0})
        shard_widths[rf"{L}\.attn\.qkv\.bias$"] = widths

    info = {
        "universal_checkpoint_version": 0.4,
        "tp_replicated_parameter_patterns": replicated,
        "parameter_with_row_parallelism_patterns": [rf"{L}\.attn\.proj\.weight$", rf"{L}\.mlp\.proj\.weight$"],
        "vocabulary_parameter_patterns": vocab,
        "original_vocab_size": cfg.vocab_size,
        "parameter_with_sub_params": qkv,
        "sub_param_shard_widths": shard_widths,
    }
    if cfg.activation == "swiglu":
        info["parameter_with_2_sub_params_cat_dim_0"] = [rf"{L}\.mlp\.fc\.weight$"]
    if cfg.tie_embeddings:
        info["pipeline_replicated_parameter_patterns"] = [r"tied_modules\.embed\.word_embeddings\.weight$"]
    return info
