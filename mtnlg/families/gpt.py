"""The GPT family's declaration: decoder-only causal language models trained on next tokens, in the gpt2, llama,
mistral and qwen2 architectures. Implemented by ``mtnlg.model.gpt``; exported as GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM (``mtnlg.convert.hf``)."""

from __future__ import annotations

from typing import Any

# model.architecture names a set of defaults (and the Hugging Face class export prefers); every knob it sets can
# be stated in the YAML instead. Export picks the HF class that represents the result exactly, or refuses.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned", "bias": True,
             "tie_embeddings": True, "rope_theta": 10000.0},
    "llama": {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope", "bias": False,
              "tie_embeddings": False, "rope_theta": 10000.0},
    "mistral": {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope", "bias": False,
                "tie_embeddings": False, "rope_theta": 10000.0},  # full causal attention (no sliding window)
    "qwen2": {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope", "bias": False,
              "qkv_bias": True, "tie_embeddings": False, "rope_theta": 1000000.0},
}

def _no_kv_channels(m, par) -> None:
    """Heads of hidden_size / num_attention_heads only (the HF classes a GPT exports to say no other width)."""
    if m.kv_channels is not None:
        raise ValueError(f"model.kv_channels = {m.kv_channels}: a head width other than hidden_size / "
                          "num_attention_heads is for T5 models only; remove model.kv_channels")


CHECKS: tuple = (_no_kv_channels,)  # beside the generic model checks of mtnlg.config.resolve
