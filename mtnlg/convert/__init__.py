"""Hugging Face export and import.

    from mtnlg.convert import export_hf, import_hf

Reading checkpoints of any (tp, pp, dp, ZeRO) layout is ``mtnlg.checkpoint``.
"""

from mtnlg.convert.hf_export import export_hf
from mtnlg.convert.hf_import import import_hf

__all__ = ["export_hf", "import_hf"]
