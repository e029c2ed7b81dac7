"""Checkpoints: tags and markers, crash-safe saving, reading any layout, weights-only writing, resharding
(DeepSpeed's universal checkpoints) and loading into a training engine.

    from mtnlg.checkpoint import open_checkpoint, full_state_dict, load_native_model
    ckpt = open_checkpoint("runs/tiny")                 # newest complete global_stepN, any layout
    model, run_cfg, tokenizer_dir = load_native_model("runs/tiny")   # the family's model at tp=1, pp=1

Below training, convert and eval: it imports none of them.
"""

from mtnlg.checkpoint.reader import NativeCheckpoint, full_state_dict, load_native_model, open_checkpoint
from mtnlg.checkpoint.reshard import reshard
from mtnlg.checkpoint.resume import LoadPlan, load, load_weights, plan_load
from mtnlg.checkpoint.saver import save
from mtnlg.checkpoint.universal import universal_checkpoint_info
from mtnlg.checkpoint.writer import write_weights_only

__all__ = ["LoadPlan", "NativeCheckpoint", "full_state_dict", "load", "load_native_model", "load_weights",
           "open_checkpoint", "plan_load", "reshard", "save", "universal_checkpoint_info", "write_weights_only"]
