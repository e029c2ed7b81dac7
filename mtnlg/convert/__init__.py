"""Hugging Face export/import and reading checkpoints of any (tp, pp, dp, ZeRO) layout.

    from mtnlg.convert import export_hf, import_hf, load_native_model, open_checkpoint
"""

from mtnlg.convert.hf_export import export_hf
from mtnlg.convert.hf_import import import_hf
from mtnlg.convert.native import full_state_dict, load_native_model, load_weights, open_checkpoint

__all__ = ["export_hf", "full_state_dict", "import_hf", "load_native_model", "load_weights", "open_checkpoint"]
