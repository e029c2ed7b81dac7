"""The BERT family's declaration: bidirectional encoders trained on masked tokens (MLM) and sentence order (SOP),
in two architectures:

- ``megatron_bert``: Megatron's BERT (pre-LN blocks, learned positions, token types, no embedding LayerNorm, a
  final LayerNorm); exported as MegatronBertForPreTraining;
- ``bert``: the original layout (post-LN blocks, an embedding LayerNorm, no final one), so that existing BERT
  checkpoints import and fine-tune; exported as BertForPreTraining.

Implemented by ``mtnlg.model.bert`` (docs/bert.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# knobs every BERT architecture fixes; ``norm_position`` is not a knob of the generic kind (it has a default), so
# the family's check below sets it from the architecture
_COMMON = {"norm": "layernorm", "position_embedding": "learned", "bias": True, "tie_embeddings": True,
           "rope_theta": 10000.0}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Megatron's fused bias-GELU is the tanh approximation
    "megatron_bert": {**_COMMON, "activation": "gelu"},
    "bert": {**_COMMON, "activation": "gelu_erf"},  # Google's BERT: exact (erf) GELU
}
NORM_POSITION = {"megatron_bert": "pre", "bert": "post"}


@dataclass(frozen=True)
class BertKnobs:
    """The model keys only BERT has (``model.<key>`` in the YAML; read as ``model.family_knobs.<key>``)."""

    binary_head: bool = True  # the sentence-order head (Linear(h, 2) on the pooled first token) and its loss
    # what the model ends in: the pretraining heads (MLM + SOP), or a fine-tuning head: classification of the
    # pooled output into num_classes, multiple choice (Linear(h, 1) per choice), or answer spans (start/end logits
    # on every token)
    head: Literal["pretrain", "classify", "multiple_choice", "span"] = "pretrain"
    num_classes: int = 2  # classes of the classification head
    num_tokentypes: int = 2  # token-type (segment A / B) embeddings
    # read by the data side (mtnlg.data.bert_dataset): the masked-LM sample builder
    mask_prob: float = 0.15  # share of tokens predicted
    short_seq_prob: float = 0.1  # probability of a sample shorter than seq_length
    max_ngram: int = 3  # whole-word n-gram masking, n <= max_ngram, p proportional to 1/n


def _norm_position(m, par) -> None:
    """``bert`` is post-LN, ``megatron_bert`` pre-LN: the architecture decides ``model.norm_position``."""
    m.norm_position = NORM_POSITION[m.architecture]


def _check(m, par) -> None:
    """One line per problem (a ValueError: ``mtnlg.config.resolve`` reports it as a ConfigError)."""
    k = m.family_knobs
    if k.num_tokentypes < 0:
        raise ValueError(f"model.num_tokentypes = {k.num_tokentypes} must be >= 0 (2 for sentence pairs)")
    if not 0.0 < k.mask_prob < 1.0:
        raise ValueError(f"model.mask_prob = {k.mask_prob} must be in (0, 1)")
    if not 0.0 <= k.short_seq_prob <= 1.0:
        raise ValueError(f"model.short_seq_prob = {k.short_seq_prob} must be in [0, 1]")
    if k.head == "classify" and k.num_classes < 2:
        raise ValueError(f"model.num_classes = {k.num_classes} must be >= 2 for the classification head")
    if k.max_ngram < 1:
        raise ValueError(f"model.max_ngram = {k.max_ngram} must be >= 1")
    if m.kv_channels is not None:
        raise ValueError(f"model.kv_channels = {m.kv_channels}: a head width other than hidden_size / "
                          "num_attention_heads is for T5 models only; remove model.kv_channels")
    if m.num_kv_heads != m.num_attention_heads:
        raise ValueError(f"model.num_kv_heads = {m.num_kv_heads}: BERT has one key/value head per query head; "
                          "remove model.num_kv_heads")
    if m.seq_length < 3:
        raise ValueError(f"model.seq_length = {m.seq_length} cannot hold [CLS] A [SEP] B [SEP]; make it >= 8")


CHECKS = (_norm_position, _check)
