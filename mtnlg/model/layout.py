"""How a model's parameters are placed and sharded: parameter groups (one per layer spec) and each
parameter's tensor-parallel rule.

A model is read and written one *group* at a time: ``embed``, ``layers.<i>``, ``final_norm``
and (untied models) ``head``. Inside a group a parameter has a *local* name (``attn.qkv.weight``);
its full name is the group's spec prefix plus the local name, exactly as DeepSpeed's
PipelineModule and GPTModel name it (``3.attn.qkv.weight``, ``tied_modules.embed.word_embeddings.weight``).

Every local name has one tensor-parallel rule (see ``tp_rule``): replicated, row-parallel
(dim 1), column-parallel (dim 0, fused blocks split separately), vocabulary-parallel (dim 0,
zero padding rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ModelConfig

# --------------------------------------------------------------------------- native names


@dataclass(frozen=True)
class Group:
    name: str  # "embed", "layers.3", "final_norm", "head"
    spec_index: int  # index in the layer-spec list (the pipeline layer file number)
    prefix: str  # full name = prefix + local name
    locals: tuple[str, ...]

    def full(self, local: str) -> str:
        return self.prefix + local


def groups(cfg: ModelConfig) -> list[Group]:
    """The parameter groups of a model, in forward order."""
    L = cfg.num_layers
    embed = ["word_embeddings.weight"] + (["position_embeddings.weight"] if cfg.position_embedding == "learned" else [])
    block = []
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc", "mlp.proj"):
        block.append(f"{part}.weight")
        if cfg.bias:
            block.append(f"{part}.bias")
    norm = ["norm.weight"] + (["norm.bias"] if cfg.bias else [])
    out = [Group("embed", 0, "tied_modules.embed." if cfg.tie_embeddings else "0.", tuple(embed))]
    out += [Group(f"layers.{i}", i + 1, f"{i + 1}.", tuple(block)) for i in range(L)]
    out.append(Group("final_norm", L + 1, f"{L + 1}.", tuple(norm)))
    if not cfg.tie_embeddings:
        out.append(Group("head", L + 2, f"{L + 2}.", ("head.weight",)))
    return out


def split_sizes(cfg: ModelConfig, key: str) -> list[int]:
    """The logical blocks of a fused tensor along dim 0."""
    if key == "qkv":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    if key == "gate_up":
        return [cfg.ffn_hidden_size, cfg.ffn_hidden_size]
    raise KeyError(key)


@dataclass(frozen=True)
class TPRule:
    kind: str  # "replicated" | "row" | "column" | "vocab"
    dim: int = 0
    sizes: tuple[int, ...] | None = None  # fused blocks split separately (column)


def tp_rule(local: str, cfg: ModelConfig) -> TPRule:
    """How the tensor-parallel shards of a parameter merge (and split)."""
    if local in ("word_embeddings.weight", "head.weight"):
        return TPRule("vocab", 0)
    if local.startswith("attn.qkv."):
        return TPRule("column", 0, tuple(split_sizes(cfg, "qkv")))
    if local.startswith("mlp.fc."):
        return TPRule("column", 0, tuple(split_sizes(cfg, "gate_up")) if cfg.activation == "swiglu" else None)
    if local in ("attn.proj.weight", "mlp.proj.weight"):
        return TPRule("row", 1)
    return TPRule("replicated")


def full_shape(local: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The merged (tp=1), unpadded shape of a parameter."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    fc_out = 2 * ffn if cfg.activation == "swiglu" else ffn
    shapes = {
        "word_embeddings.weight": (cfg.vocab_size, h),
        "head.weight": (cfg.vocab_size, h),
        "position_embeddings.weight": (cfg.max_position_embeddings, h),
        "attn.qkv.weight": (q + 2 * kv, h),
        "attn.qkv.bias": (q + 2 * kv,),
        "attn.proj.weight": (h, q),
        "mlp.fc.weight": (fc_out, h),
        "mlp.fc.bias": (fc_out,),
        "mlp.proj.weight": (h, ffn),
    }
    return shapes.get(local, (h,))  # norms and output biases


def local_shape(local: str, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """The shape one tensor-parallel rank holds (vocabulary padded as ``cfg`` pads it for ``tp``)."""
    shape = list(full_shape(local, cfg))
    rule = tp_rule(local, cfg)
    if rule.kind == "vocab":
        shape[0] = cfg.padded_vocab_size // tp
    elif rule.kind != "replicated":
        shape[rule.dim] //= tp
    return tuple(shape)
