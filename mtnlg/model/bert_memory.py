"""The BERT family's activation memory per micro batch (what ``mtnlg.training.memory`` adds up).

The blocks are the GPT family's ``TransformerBlock`` with a bidirectional mask, so a block keeps what
the GPT family's memory model counts (plus, with selective recompute, the padding mask the checkpointed core keeps).
Past the blocks: the final norm (megatron_bert), the MLM transform (dense input, GELU input, LayerNorm input and
statistics), the decoder's input and the logits the loss keeps, for the predicted tokens only (at most
``round(mask_prob * (T - 3))`` per row; every token under sequence parallelism: ``mtnlg.model.bert``); the pooler
and the binary head work on one token per row (negligible).
"""

from __future__ import annotations

import dataclasses

from mtnlg.config import ModelConfig
from mtnlg.model.registry import family


def _blocks():
    """The memory terms of the shared TransformerBlock, counted by the GPT family's memory model."""
    return family("gpt2").memory


def attention_kind(m: ModelConfig, precision: str, device: str = "cpu") -> str:
    return _blocks().attention_kind(m, precision, device)


def norm_stats_bytes(m: ModelConfig, tokens: float, tp: int, sp: bool) -> float:
    return _blocks().norm_stats_bytes(m, tokens, tp, sp)


def head_rows(m: ModelConfig, sp: bool) -> int:
    """Rows per sample the MLM head runs on: the predicted tokens of a full-length pair, the most a sample has
    (``round(mask_prob * (T - 3))``: [CLS] A [SEP] B [SEP]); every token under sequence parallelism, and for a
    fine-tuning head."""
    if sp or m.family_knobs.head != "pretrain":
        return m.seq_length
    return max(1, int(round(m.family_knobs.mask_prob * (m.seq_length - 3))))


def loss_backward_bytes(m: ModelConfig, micro: int, tp: int, precision: str, device: str = "cpu",
                        sp: bool = False) -> float:
    """The MLM loss's backward: as a GPT's over the same logits (the SOP loss's is two numbers per row)."""
    return _blocks().loss_backward_bytes(dataclasses.replace(m, seq_length=head_rows(m, sp)), micro, tp, precision,
                                         device)


def layer_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str,
                           attention: str = "flash", device: str = "cpu") -> float:
    """A GPT block's bytes; with selective recompute also the (B, 1, T, T) boolean padding mask, which the
    checkpointed attention core keeps as an input (measured: tests/test_memory.py)."""
    base = _blocks().layer_activation_bytes(m, micro, tp, sp, precision, attention, device)
    return base + micro * m.seq_length * m.seq_length if m.recompute == "selective" else base


def embedding_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str) -> float:
    """The embedding dropout's mask, (``bert``) the embedding LayerNorm's input and statistics, and under full
    recompute the int64 (B, T) tensors every block's checkpoint keeps (one tensor each): the padding, and in
    pretraining without sequence parallelism the ``predicted`` rows."""
    e = 4 if precision == "fp32" else 2
    sbh = m.seq_length * micro * m.hidden_size
    norm = e * sbh + norm_stats_bytes(m, m.seq_length * micro, 1, False) if m.norm_position == "post" else 0.0
    carried = 2 if head_rows(m, sp) < m.seq_length else 1
    padding = carried * 8 * micro * m.seq_length if m.recompute == "full" else 0.0
    return norm + padding + _blocks().embedding_activation_bytes(m, micro, tp, sp, precision)


def head_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str, device: str = "cpu") -> float:
    """Final norm (pre-LN only; its input and statistics for every token), then for the head's rows (``head_rows``):
    MLM transform (dense input, GELU input, LayerNorm input and statistics), decoder input and the logits
    (rows, V/tp)."""
    e = 4 if precision == "fp32" else 2
    tokens = m.seq_length * micro
    final = e * tokens * m.hidden_size + norm_stats_bytes(m, tokens, 1, False) if m.norm_position == "pre" else 0.0
    rows = head_rows(m, sp) * micro
    rh = rows * m.hidden_size
    norm = e * rh + norm_stats_bytes(m, rows, 1, False)
    return final + 2 * e * rh + norm + e * rh + e * rows * m.padded_vocab_size / tp
