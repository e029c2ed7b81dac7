"""GPT model: blocks, presets (gpt2, llama) and the layer-spec list every layout builds from."""

from mtnlg.model.gpt import GPTLoss, GPTModel, layer_specs

__all__ = ["GPTLoss", "GPTModel", "layer_specs"]
