"""MegatronBertForPreTraining <-> mtnlg's megatron_bert architecture: pre-LN blocks (``attention.ln`` before
attention, ``ln`` before the MLP), no embedding LayerNorm, a final ``bert.encoder.ln``, the pooler, the MLM head
(``cls.predictions``: transform dense, GELU, LayerNorm, the tied word embeddings plus ``bias``) and the binary head
(``cls.seq_relationship``). ``bert.py`` (BertForPreTraining) reuses the heads' rows and the helpers here."""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.convert.keymaps import COPY, fixed_misfit

MODEL_TYPE, HF_CLASS = "megatron-bert", "MegatronBertForPreTraining"
FIXED = {"norm": "layernorm", "position_embedding": "learned", "bias": True, "qkv_bias": True,
         "tie_embeddings": True, "norm_position": "pre"}
ACTIVATIONS = {"gelu": "gelu_new", "gelu_erf": "gelu"}  # mtnlg -> HF hidden_act
FROM_HF_ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}

EMBED = [("bert.embeddings.word_embeddings", "word_embeddings", COPY),
         ("bert.embeddings.position_embeddings", "position_embeddings", COPY),
         ("bert.embeddings.token_type_embeddings", "tokentype_embeddings", COPY)]
QKV = [("bert.encoder.layer.{}.attention.self.query", "attn.qkv", ("part", 0)),
       ("bert.encoder.layer.{}.attention.self.key", "attn.qkv", ("part", 1)),
       ("bert.encoder.layer.{}.attention.self.value", "attn.qkv", ("part", 2)),
       ("bert.encoder.layer.{}.attention.output.dense", "attn.proj", COPY)]
MLP = [("bert.encoder.layer.{}.intermediate.dense", "mlp.fc", COPY),
       ("bert.encoder.layer.{}.output.dense", "mlp.proj", COPY)]
HEADS = {  # a model has the rows of its head (model.head) only: rows of modules it lacks map nothing
    "head": [("bert.pooler.dense", "pooler", COPY), ("cls.predictions.transform.dense", "transform", COPY),
             ("cls.predictions.transform.LayerNorm", "norm", COPY),
             ("classifier", "classifier", COPY), ("qa_outputs", "qa", COPY)],
    "output": [("cls.predictions", "lm", COPY), ("cls.seq_relationship", "binary", COPY)],
}
KEYMAP = {
    "embed": EMBED,
    "layer": [("bert.encoder.layer.{}.attention.ln", "norm1", COPY), *QKV,
              ("bert.encoder.layer.{}.ln", "norm2", COPY), *MLP],
    "final_norm": [("bert.encoder.ln", "norm", COPY)],
    **HEADS,
}
# copies of tied weights a checkpoint may also hold (the decoder is the word embeddings and ``cls.predictions.bias``)
TIED_COPIES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


# model.head -> the HF class suffix (MegatronBert..., Bert...)
HEAD_CLASSES = {"pretrain": "ForPreTraining", "classify": "ForSequenceClassification",
                "multiple_choice": "ForMultipleChoice", "span": "ForQuestionAnswering"}


def config_class():
    from transformers import MegatronBertConfig

    return MegatronBertConfig


def hf_class_name(cfg: ModelConfig, base: str = "MegatronBert") -> str:
    """The HF class of a model's head (``model.head``)."""
    return base + HEAD_CLASSES[cfg.family_knobs.head]


def head_section(hf, base: str, refuse) -> dict:
    """``model.head`` (and ``num_classes``) from an HF config's ``architectures``."""
    names = list(getattr(hf, "architectures", None) or [base + HEAD_CLASSES["pretrain"]])
    for head, suffix in HEAD_CLASSES.items():
        if names[0] == base + suffix:
            if head == "span" and hf.num_labels != 2:
                refuse(f"num_labels {hf.num_labels} for question answering (start and end: 2)")
            return {"head": head, "num_classes": hf.num_labels} if head == "classify" else {"head": head}
    refuse(f"architectures {names} (mtnlg has " + ", ".join(base + s for s in HEAD_CLASSES.values()) + ")")
    return {}


def bert_misfit(hf_class: str, fixed: dict, cfg: ModelConfig) -> str | None:
    found = fixed_misfit(hf_class, fixed, cfg)
    if found is None and cfg.activation not in ACTIVATIONS:
        return f"model.activation = {cfg.activation} ({hf_class} has GELU)"
    if found is None and not cfg.family_knobs.binary_head and cfg.family_knobs.head == "pretrain":
        return f"model.binary_head = false ({hf_class} has the binary head)"
    return found


def misfit(cfg: ModelConfig) -> str | None:
    return bert_misfit(HF_CLASS, FIXED, cfg)


def bert_config(cfg: ModelConfig, common: dict, base: str = "MegatronBert") -> dict:
    """The keyword arguments MegatronBertConfig and BertConfig share (the class named by the model's head)."""
    k = cfg.family_knobs
    common = {**common, "architectures": [hf_class_name(cfg, base)]}
    if k.head == "classify":
        common["num_labels"] = k.num_classes
    return {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.ffn_hidden_size,
            "hidden_act": ACTIVATIONS[cfg.activation], "hidden_dropout_prob": cfg.hidden_dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout,
            "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.family_knobs.num_tokentypes, "layer_norm_eps": cfg.norm_eps, **common}


def class_name(cfg: ModelConfig) -> str:
    return hf_class_name(cfg)


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(**bert_config(cfg, common))


def bert_section(kind: str, hf, refuse, base: str = "MegatronBert") -> dict:
    """The ``model:`` section of a MegatronBert or Bert config (its head from ``architectures``)."""
    if hf.hidden_act not in FROM_HF_ACTIVATIONS:
        refuse(f"hidden_act {hf.hidden_act!r}")
    if hf.is_decoder or hf.add_cross_attention:
        refuse("a decoder configuration (is_decoder / add_cross_attention)")
    if getattr(hf, "position_embedding_type", "absolute") not in (None, "absolute"):
        refuse(f"position_embedding_type {hf.position_embedding_type!r}")
    if not getattr(hf, "tie_word_embeddings", True):
        refuse("tie_word_embeddings false (an MLM decoder of its own)")
    return {
        "architecture": kind, "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "ffn_hidden_size": hf.intermediate_size,
        "seq_length": hf.max_position_embeddings, "max_position_embeddings": hf.max_position_embeddings,
        "vocab_size": hf.vocab_size, "activation": FROM_HF_ACTIVATIONS[hf.hidden_act],
        "norm_eps": hf.layer_norm_eps, "hidden_dropout": float(hf.hidden_dropout_prob),
        "attention_dropout": float(hf.attention_probs_dropout_prob), "init_std": hf.initializer_range,
        "num_tokentypes": hf.type_vocab_size, **head_section(hf, base, refuse),
    }


def model_section(hf, refuse) -> dict:
    return bert_section("megatron_bert", hf, refuse)


# --- export --verify: what the HF model and mtnlg's are run on, and what is compared


def verify_inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(tokens, types, padding) of a few sequence pairs, the last rows padded: BertModel's and HF's inputs
    ((B, C, T) each for multiple choice: 3 choices)."""
    T = min(cfg.seq_length, cfg.max_position_embeddings, 128)
    choices = 3 if cfg.family_knobs.head == "multiple_choice" else 0
    rows = batch * max(choices, 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows, T), generator=gen)
    cut = torch.arange(T) >= T // 2
    types = cut.long().expand(rows, T).clone() if cfg.family_knobs.num_tokentypes > 1 else torch.zeros_like(tokens)
    lengths = torch.tensor([T - 3 * (r % 4) for r in range(rows)]).clamp(min=2)
    padding = (torch.arange(T)[None, :] < lengths[:, None]).long()
    if choices:
        return tuple(t.reshape(batch, choices, T) for t in (tokens, types, padding))
    return tokens, types, padding


def hf_outputs(model, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What an HF model of one of the classes above returns on ``verify_inputs``, as mtnlg's model returns it: MLM
    and sentence-order logits; class or choice logits; start and end logits stacked (B, T, 2)."""
    tokens, types, padding = inputs
    out = model(input_ids=tokens, token_type_ids=types, attention_mask=padding)
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    if hasattr(out, "start_logits"):
        return (torch.stack([out.start_logits, out.end_logits], dim=-1),)
    return (out.logits,)


def training_kwargs(inputs: tuple, labels: tuple) -> dict:
    """What the HF pretraining class takes for one training step on mtnlg's BERT micro batch (``mtnlg bench``'s peer):
    the MLM labels at the predicted positions (-100 elsewhere: HF's ignored index) and the sentence-order label; HF's
    loss is then mtnlg's, the MLM mean over predicted tokens plus the SOP cross-entropy."""
    tokens, types, padding = inputs[:3]  # (a pretraining batch's fourth input is the loss mask again)
    mlm, loss_mask, is_random = labels
    return {"input_ids": tokens, "token_type_ids": types, "attention_mask": padding,
            "labels": mlm.masked_fill(loss_mask == 0, -100), "next_sentence_label": is_random}
