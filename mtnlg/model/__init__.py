"""GPT model: blocks (their knobs set by model.architecture), the layer-spec list every layout builds from,
and the layout of its parameters read off the model."""

from mtnlg.model.gpt import GPTLoss, GPTModel, layer_specs

__all__ = ["GPTLoss", "GPTModel", "layer_specs"]
