"""T5ForConditionalGeneration <-> mtnlg's t5 architecture (v1.1: gated-GELU, untied output layer; the original T5:
ReLU, output layer tied to the embedding with its input scaled by d_model^-0.5).

Transformers 5.x always ties T5's ``lm_head`` to ``shared`` unless the files hold both with different values, and
scales the decoder's output exactly when config.json's ``tie_word_embeddings`` is not false. So an untied (v1.1)
export writes both tensors and ``tie_word_embeddings: false``; importing a v1.1 directory whose ``lm_head`` was
saved tied (only ``shared.weight``) starts mtnlg's untied output layer from the embedding (what transformers
computes with it).

Encoder block i is mtnlg's ``layers.i``, decoder block j is ``layers.<encoder_layers + j>``; each stack's first block
holds its relative position bias table.
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.convert.keymaps import COPY

MODEL_TYPE, HF_CLASS = "t5", "T5ForConditionalGeneration"

KEYMAP = {
    "embed": [("shared", "word_embeddings", COPY)],
    "encoder_final_norm": [("encoder.final_layer_norm", "norm", COPY)],
    "final_norm": [("decoder.final_layer_norm", "norm", COPY)],
    "head": [("lm_head", "head", COPY)],
}
# buffers or tied copies a directory may hold besides the weights mtnlg maps
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _attention(prefix: str, native: str) -> list:
    return [(f"{prefix}.q", f"{native}.qkv", ("part", 0)), (f"{prefix}.k", f"{native}.qkv", ("part", 1)),
            (f"{prefix}.v", f"{native}.qkv", ("part", 2)), (f"{prefix}.o", f"{native}.proj", COPY),
            (f"{prefix}.relative_attention_bias", "relative_bias", COPY)]


def _feed_forward(prefix: str, cfg: ModelConfig) -> list:
    if cfg.family_knobs.feed_forward == "gated-gelu":
        return [(f"{prefix}.wi_0", "mlp.fc", ("part", 0)), (f"{prefix}.wi_1", "mlp.fc", ("part", 1)),
                (f"{prefix}.wo", "mlp.proj", COPY)]
    return [(f"{prefix}.wi", "mlp.fc", COPY), (f"{prefix}.wo", "mlp.proj", COPY)]


def rows(cfg: ModelConfig, group: str) -> list:
    """(HF module, native module, op) of a parameter group (``mtnlg.convert.keymaps``)."""
    if not group.startswith("layers."):
        return list(KEYMAP[group])
    i = int(group.split(".")[1])
    enc, _ = cfg.family_knobs.depths(cfg.num_layers)
    if i < enc:
        b = f"encoder.block.{i}.layer"
        return [(f"{b}.0.layer_norm", "norm1", COPY), *_attention(f"{b}.0.SelfAttention", "attn"),
                (f"{b}.1.layer_norm", "norm2", COPY), *_feed_forward(f"{b}.1.DenseReluDense", cfg)]
    b = f"decoder.block.{i - enc}.layer"
    cross = f"{b}.1.EncDecAttention"
    return [(f"{b}.0.layer_norm", "norm1", COPY), *_attention(f"{b}.0.SelfAttention", "attn"),
            (f"{b}.1.layer_norm", "cross_norm", COPY), (f"{cross}.q", "cross_attn.q", COPY),
            (f"{cross}.k", "cross_attn.kv", ("part", 0)), (f"{cross}.v", "cross_attn.kv", ("part", 1)),
            (f"{cross}.o", "cross_attn.proj", COPY),
            (f"{b}.2.layer_norm", "norm2", COPY), *_feed_forward(f"{b}.2.DenseReluDense", cfg)]


def config_class():
    from transformers import T5Config

    return T5Config


def misfit(cfg: ModelConfig) -> str | None:
    for knob, value in (("norm", "rmsnorm"), ("bias", False), ("qkv_bias", False), ("norm_position", "pre"),
                        ("num_kv_heads", cfg.num_attention_heads)):
        if getattr(cfg, knob) != value:
            return f"model.{knob} = {getattr(cfg, knob)} ({HF_CLASS} has {value})"
    if cfg.attention_dropout != cfg.hidden_dropout:
        return (f"model.attention_dropout = {cfg.attention_dropout} with hidden_dropout = {cfg.hidden_dropout} "
                f"({HF_CLASS} has one dropout_rate)")
    return None


def to_hf_config(cfg: ModelConfig, common: dict):
    k = cfg.family_knobs
    enc, dec = k.depths(cfg.num_layers)
    pad = common.get("pad_token_id") if common.get("pad_token_id") is not None else 0
    return config_class()(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, d_kv=cfg.head_dim, d_ff=cfg.ffn_hidden_size,
        num_layers=enc, num_decoder_layers=dec, num_heads=cfg.num_attention_heads,
        relative_attention_num_buckets=k.relative_attention_num_buckets,
        relative_attention_max_distance=k.relative_attention_max_distance, dropout_rate=cfg.hidden_dropout,
        layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=k.feed_forward, tie_word_embeddings=k.tie_word_embeddings,
        # the decoder starts with the pad token (the tokenizer's: 0 in HF's T5 layout and `tokenizer train
        # --vocab-extra-ids`; an extended tokenizer's pad follows its own vocabulary)
        initializer_factor=1.0, pad_token_id=pad, decoder_start_token_id=pad,
        eos_token_id=common.get("eos_token_id") if common.get("eos_token_id") is not None else 1,
        dtype=common.get("dtype"), architectures=common.get("architectures"))


def model_section(hf, refuse) -> dict:
    if hf.feed_forward_proj not in ("gated-gelu", "relu"):
        refuse(f"feed_forward_proj {hf.feed_forward_proj!r}")
    dec = hf.num_decoder_layers if hf.num_decoder_layers is not None else hf.num_layers
    return {
        "architecture": "t5", "num_layers": hf.num_layers + dec, "encoder_layers": hf.num_layers,
        "decoder_layers": dec, "hidden_size": hf.d_model, "num_attention_heads": hf.num_heads,
        "ffn_hidden_size": hf.d_ff, "seq_length": 512,
        # heads narrower or wider than d_model / num_heads (T5-11B: 128 x 128 over 1024)
        "kv_channels": hf.d_kv if hf.d_kv * hf.num_heads != hf.d_model else None,
        "vocab_size": hf.vocab_size, "norm_eps": hf.layer_norm_epsilon,
        "relative_attention_num_buckets": hf.relative_attention_num_buckets,
        "relative_attention_max_distance": hf.relative_attention_max_distance,
        "feed_forward": hf.feed_forward_proj, "tie_word_embeddings": bool(getattr(hf, "scale_decoder_outputs", True)),
        "hidden_dropout": float(hf.dropout_rate), "attention_dropout": float(hf.dropout_rate),
    }


def hf_name(name: str, have: set[str]) -> str | None:
    """A v1.1 output layer saved tied to the embedding (transformers 5.x) is read from ``shared.weight``."""
    if name in have:
        return name
    if name == "lm_head.weight" and "shared.weight" in have:
        return "shared.weight"
    return None


def ignored(name: str) -> bool:
    """Tensors of a directory that map to nothing of mtnlg's: tied copies of the embedding (and of the output layer
    of a tied model), and an unused cross-attention bias table of old checkpoints."""
    return name in TIED_COPIES or name == "lm_head.weight"


def verify_inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """mtnlg's inputs of one sample batch, with some padding in both stacks: (encoder ids, encoder padding,
    decoder ids, decoder padding)."""
    gen = torch.Generator().manual_seed(seed)
    s, t = min(cfg.seq_length, 64), min(cfg.family_knobs.decoder_length(cfg.seq_length), 32)
    enc = torch.randint(0, cfg.vocab_size, (batch, s), generator=gen)
    dec = torch.randint(0, cfg.vocab_size, (batch, t), generator=gen)
    enc_pad, dec_pad = torch.ones_like(enc), torch.ones_like(dec)
    enc_pad[0, s - s // 4:] = 0  # a padded encoder row: cross-attention must not see it
    return enc, enc_pad, dec, dec_pad


def hf_outputs(model, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What T5ForConditionalGeneration returns on ``verify_inputs``, as mtnlg's model returns it: the logits."""
    enc, enc_pad, dec, dec_pad = inputs
    out = model(input_ids=enc, attention_mask=enc_pad, decoder_input_ids=dec, decoder_attention_mask=dec_pad)
    return (out.logits,)


def training_kwargs(inputs: tuple, labels) -> dict:
    """What T5ForConditionalGeneration takes for one training step on mtnlg's T5 micro batch (``mtnlg bench``'s
    peer): the encoder's tokens and padding, the decoder's inputs and padding, and its targets (mtnlg's unpredicted
    positions, labels < 0, as HF's ignored index -100)."""
    enc, enc_pad, dec, dec_pad = inputs
    return {"input_ids": enc, "attention_mask": enc_pad, "decoder_input_ids": dec, "decoder_attention_mask": dec_pad,
            "labels": labels.masked_fill(labels < 0, -100)}
