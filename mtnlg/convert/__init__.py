"""Hugging Face export and import.

    from mtnlg.convert import export_hf, import_hf

Reading checkpoints of any (tp, pp, dp, ZeRO) layout is ``mtnlg.checkpoint``. The two are imported on first use
(PEP 562), so the CLI can register ``export-hf``/``import-hf`` (``mtnlg.convert.commands``) without loading torch.
"""

from __future__ import annotations

__all__ = ["export_hf", "import_hf"]


def __getattr__(name: str):
    if name == "export_hf":
        from mtnlg.convert.hf_export import export_hf

        return export_hf
    if name == "import_hf":
        from mtnlg.convert.hf_import import import_hf

        return import_hf
    raise AttributeError(f"module 'mtnlg.convert' has no attribute {name!r}")
