"""Models: shared blocks, one registered family per model kind (``mtnlg.model.registry``; the GPT family is
``mtnlg.model.gpt``), and the layout of their parameters read off the model (``mtnlg.model.layout``).

``GPTModel`` is re-exported here as the Python API's entry point (``GPTModel.from_config({...})``); code inside
mtnlg reaches a family through ``mtnlg.model.registry.family(cfg)``."""

from mtnlg.model.gpt import GPTLoss, GPTModel, layer_specs

__all__ = ["GPTLoss", "GPTModel", "layer_specs"]
